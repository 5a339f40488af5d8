# The trainer on the official TensorFlow GPU image (CUDA and cuDNN included), as the manifests in
# k8s/ run it:
#   docker build -t us-docker.pkg.dev/PROJECT_ID/trainer/trainer:0.1.0 .
# The tag's major.minor must be setup.py's tensorflow pin (tests/test_k8s.py checks it). To rebuild
# on exactly the same base, add the digest `docker pull` prints: tensorflow/tensorflow:2.21.0-gpu@sha256:...
FROM tensorflow/tensorflow:2.21.0-gpu

# Logs reach `kubectl logs` as they are written; nothing tries to write .pyc files into the pods'
# read-only root filesystem.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# The dependencies first, in a layer of their own: setup.py without trainer/ installs them (and an
# empty package), so a change to the code rebuilds only the layers after it. Keep the image's
# TensorFlow, built for its CUDA: the constraint makes pip fail instead of replacing it should
# setup.py's pin ever disagree. PIP_BREAK_SYSTEM_PACKAGES: the image's Python is the system one,
# which newer Ubuntu releases protect from pip; older ones ignore it.
COPY setup.py ./
RUN python -c "from importlib.metadata import version; print('tensorflow==' + version('tensorflow'))" \
      > /tmp/image-tensorflow.txt \
 && PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install --no-cache-dir --constraint /tmp/image-tensorflow.txt . \
 && rm -rf /tmp/image-tensorflow.txt
# Then the trainer itself, over the empty package, resolving nothing again.
COPY trainer/ trainer/
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install --no-cache-dir --no-deps --force-reinstall . \
 && rm -rf /src

# A fixed numeric non-root user, the pods' runAsUser (k8s/base/job.yaml): Kubernetes can only
# check runAsNonRoot against a numeric USER. Newer bases already have a user 1000 (ubuntu).
RUN getent passwd 1000 > /dev/null || useradd --uid 1000 --user-group --no-create-home --home-dir /tmp trainer
USER 1000:1000

# The pods mount an emptyDir at /tmp and keep the rest read-only: Keras, matplotlib and the
# trainer's checkpoint staging write under HOME and TMPDIR, so both point there.
ENV HOME=/tmp \
    TMPDIR=/tmp
WORKDIR /tmp

ENTRYPOINT ["python", "-m", "trainer.task"]
CMD []
