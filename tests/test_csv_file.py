import pandas as pd
import pytest

from trainer import storage
from trainer.errors import UserError
from trainer.data import csv_file


def write(tmp_path, text, name="t.csv"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_numeric_features_default_to_every_other_numeric_column(tmp_path):
  path = write(tmp_path, "a,b,name,y\n1,2,x,3\n4,5,y,6\n")
  frame, gaps = csv_file.read_columns(path, "y")
  assert list(frame.columns) == ["y", "a", "b"]
  assert gaps == {"missing_rows": 0, "missing_action": "none"}


def test_missing_column_lists_the_columns(tmp_path):
  path = write(tmp_path, "Date,Close\n2020-01-01,1\n")
  with pytest.raises(UserError, match=r"--target_column='close' is not a column of .*: Date, Close"):
    csv_file.read_columns(path, "close")
  with pytest.raises(UserError, match=r"--date_column='day' is not a column"):
    csv_file.read_columns(path, "Close", date_column="day")


def test_non_numeric_value_is_named_with_its_line(tmp_path):
  path = write(tmp_path, "x,y\n1,2\n3,abc\n4,5\n")
  with pytest.raises(UserError, match=r"column 'y' .* 1 non-numeric values \(first at line 3: 'abc'\)"):
    csv_file.read_columns(path, "y")


def test_bad_date_is_named_with_its_line(tmp_path):
  path = write(tmp_path, "Date,Close\n2020-01-01,1\nsoon,2\n")
  with pytest.raises(UserError, match=r"--date_column='Date' .*first at line 3: 'soon'"):
    csv_file.read_columns(path, "Close", date_column="Date")


def test_rows_are_sorted_by_date(tmp_path):
  path = write(tmp_path, "Date,Close\n2020-01-03,3\n2020-01-01,1\n2020-01-02,2\n")
  frame, _ = csv_file.read_columns(path, "Close", date_column="Date")
  assert frame.Close.tolist() == [1, 2, 3]


def test_gaps_in_a_series_are_filled_forward_and_counted(tmp_path):
  path = write(tmp_path, "Date,Close\n2020-01-01,\n2020-01-02,2\n2020-01-03,\n2020-01-06,4\n")
  frame, gaps = csv_file.read_columns(path, "Close", date_column="Date", fill_gaps=True)
  assert frame.Close.tolist() == [2, 2, 4]
  assert gaps["missing_rows"] == 2 and "filled forward" in gaps["missing_action"]


def test_gaps_in_a_table_are_dropped_and_counted(tmp_path):
  path = write(tmp_path, "x,y\n1,2\n,3\n4,\n5,6\n")
  frame, gaps = csv_file.read_columns(path, "y")
  assert frame.y.tolist() == [2, 6]
  assert gaps == {"missing_rows": 2, "missing_action": "dropped"}


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\xfa"])
def test_unreadable_file(tmp_path, content):
  path = tmp_path / "bad.csv"
  path.write_bytes(content)
  with pytest.raises(UserError, match=r"--data=.*bad.csv: cannot read it as CSV"):
    csv_file.read_columns(str(path), "y")


def test_file_with_no_complete_row(tmp_path):
  path = write(tmp_path, "x,y\n1,\n,2\n")
  with pytest.raises(UserError, match="no row has values in every column"):
    csv_file.read_columns(path, "y")


def test_dates_come_back_as_timestamps(tmp_path):
  path = write(tmp_path, "Date,Close\n2020-01-01,1\n")
  frame, _ = csv_file.read_columns(path, "Close", date_column="Date")
  assert frame.Date[0] == pd.Timestamp("2020-01-01")


@pytest.mark.parametrize("name", ["prices.csv", "prices.csv.gz"])
def test_a_csv_on_gcs_reads_like_the_local_copy(prices_csv, gcs_bucket, name):
  path = prices_csv(rows=50, name=name)  # pandas writes .gz compressed, by the name
  remote = storage.join(gcs_bucket, "data", name)
  with open(path, "rb") as f:
    storage.write_bytes(remote, f.read())
  local_frame, local_gaps = csv_file.read_columns(path, "Close", date_column="Date")
  remote_frame, remote_gaps = csv_file.read_columns(remote, "Close", date_column="Date")
  pd.testing.assert_frame_equal(remote_frame, local_frame)
  assert remote_gaps == local_gaps and len(remote_frame) == 50


def test_a_missing_csv_on_gcs_is_the_same_one_line_error(tmp_path, gcs_bucket):
  for path in (str(tmp_path / "prices.csv"), storage.join(gcs_bucket, "prices.csv")):
    with pytest.raises(UserError) as error:
      csv_file.read_columns(path, "Close")
    assert str(error.value) == (f"--data={path}: cannot read it as CSV ([Errno 2] No such file or directory: "
                                f"'{path}'); give a CSV file with a header row")


def test_an_unusable_bucket_is_a_storage_error_not_a_user_error(gcs_emulator):
  with pytest.raises(storage.StorageError, match=r"^gs://no-such-bucket-y/prices.csv: bucket not found"):
    csv_file.read_columns("gs://no-such-bucket-y/prices.csv", "Close")
