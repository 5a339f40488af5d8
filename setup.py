"""Package metadata: `pip install -e .` for the trainer, `pip install -e ".[test]"` for its tests."""

from setuptools import find_packages, setup

setup(
    name="tf-trainer-jobs",
    version="0.1.0",
    description="Distributed TensorFlow training jobs: dense, recurrent and convolutional models from one trainer.",
    packages=find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow==2.21.*",
        "tensorflow-datasets>=4.9",
        "google-cloud-storage>=2.14",
        "tensorboard==2.21.*",  # TensorFlow 2.21 no longer pulls it in; tf.summary needs it
        "absl-py>=2.1",
        "matplotlib>=3.8",
        "pandas>=2.1",  # CSV parsing with dates and missing values
        "cloudml-hypertune>=0.1.0.dev6",  # Vertex AI tuning trials report their metric through it
        "pyyaml>=6",  # scripts/submit.py fills in Kubernetes and Vertex AI configs
        "tensorflow-serving-api==2.21.*",  # PredictionLog protos: every export's warm-up requests (trainer.warmup)
    ],
    # scipy: the tests and scripts/benchmark_input.py compare against ImageDataGenerator, which needs it.
    # gcp-storage-emulator: gs:// is tested against a local emulator, never the network (2026.7 checked).
    # pytest-xdist: the suite runs on both cores (-n 2); its tests share no files, ports or emulator.
    # pytest-timeout: a hung test fails (pytest.ini's timeout) instead of holding CI until its limit.
    # kubernetes-validate: k8s/ is checked against the Kubernetes API schemas it ships (1.25-1.37).
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3",
                             "scipy>=1.10", "gcp-storage-emulator>=2026.7",
                             "kubernetes-validate>=1.32"]},
    entry_points={"console_scripts": ["trainer=trainer.task:run"]},
)
