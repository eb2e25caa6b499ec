"""Reading data sets and writing result files."""
import csv

import h5py
import numpy as np
import pytest

from cpadgn import data as data_mod
from cpadgn.data import check_output_path, read_data, write_array, write_table
from cpadgn.errors import CpadgnError


# ------------------------------------------------------------------ reading CSV
def test_csv_with_and_without_header(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,c\n1,2,3\n4.5,-6e-3,7\n")
    (tmp_path / "n.csv").write_text("1,2,3\n4.5,-6e-3,7\n\n")
    want = np.array([[1, 2, 3], [4.5, -6e-3, 7]])
    for name in ("h.csv", "n.csv"):
        X = read_data(tmp_path / name)
        assert X.dtype == np.float64 and X.flags.c_contiguous
        np.testing.assert_array_equal(X, want)


def test_csv_header_of_column_numbers(tmp_path):
    """pandas' header for an unnamed array (0..D-1, or 1..D) is a header from D = 4 on;
    other integer rows, and three or fewer columns, stay data."""
    rows = "1.5,2,3,4\n5,6,7,8\n"
    for head in ("0,1,2,3", "1,2,3,4", " 0, 1 ,2,3"):
        (tmp_path / "p.csv").write_text(f"{head}\n{rows}")
        np.testing.assert_array_equal(read_data(tmp_path / "p.csv"), [[1.5, 2, 3, 4], [5, 6, 7, 8]])
    for first, cols in (("0,1,2\n", 3), ("0,1,2,4\n", 4), ("0.0,1,2,3\n", 4), ("2,3,4,5\n", 4)):
        (tmp_path / "d.csv").write_text(first + ",".join(["7"] * cols) + "\n")
        assert read_data(tmp_path / "d.csv").shape == (2, cols)


@pytest.mark.parametrize("D", [2, 3])
def test_csv_pandas_header_of_few_columns(tmp_path, D):
    """DataFrame(X).to_csv(index=False) with D = 2 or 3 writes the header 0,1(,2) above rows
    written in decimals: a header, not a data row silently added (wave.csv has D = 2)."""
    import pandas as pd
    X = np.arange(4.0 * D).reshape(4, D) / 7
    pd.DataFrame(X).to_csv(tmp_path / "p.csv", index=False)
    np.testing.assert_array_equal(read_data(tmp_path / "p.csv"), X)
    pd.DataFrame(X).to_csv(tmp_path / "i.csv")                      # with its index: refused
    with pytest.raises(CpadgnError, match="pandas index"):
        read_data(tmp_path / "i.csv")


@pytest.mark.parametrize("first", ["0.5,?,0.25", "3,?,4", "0.5,-,2", "1e-3,NIL,2", "0.5,0.25x,1", "3,1_0,4"])
def test_csv_first_row_of_numbers_and_a_bad_cell_is_refused(tmp_path, first):
    """A first row holding numbers and a stray marker ('?', as in UCI files) was taken for a
    header and dropped without a word; it is refused, naming the cell."""
    (tmp_path / "q.csv").write_text(f"{first}\n0.5,1,2\n")
    with pytest.raises(CpadgnError, match=r"line 1 mixes numbers and text .* in column 2"):
        read_data(tmp_path / "q.csv")


@pytest.mark.parametrize("head", ["id,2019,2020", "#,a,b", ",a,b", "x1,x2,3"])
def test_csv_headers_with_numbers_or_symbols_stay_headers(tmp_path, head):
    (tmp_path / "h.csv").write_text(f"{head}\n0.5,1,2\n")
    np.testing.assert_array_equal(read_data(tmp_path / "h.csv"), [[0.5, 1, 2]])


@pytest.mark.parametrize("columns", [None, ["a", "b", "c", "d"]])
def test_csv_with_a_pandas_index_column_is_refused(tmp_path, columns):
    """DataFrame.to_csv writes its row index as an unnamed first column by default: that is
    not a feature, and the refusal says how to write the file (index=False), which then
    reads back as the array."""
    import pandas as pd
    X = np.arange(12.0).reshape(3, 4) / 7
    df = pd.DataFrame(X, columns=columns)
    df.to_csv(tmp_path / "i.csv")
    with pytest.raises(CpadgnError, match=r"pandas index.*index=False"):
        read_data(tmp_path / "i.csv")
    df.to_csv(tmp_path / "n.csv", index=False)
    np.testing.assert_array_equal(read_data(tmp_path / "n.csv"), X)
    (tmp_path / "k.csv").write_text(",a,b\n5.5,1,2\n6,3,4\n")      # an unnamed column of data
    np.testing.assert_array_equal(read_data(tmp_path / "k.csv"), [[5.5, 1, 2], [6, 3, 4]])
    (tmp_path / "r.csv").write_text(",a,b\n5,1,2\n5,3,4\n")          # whole numbers, repeated
    np.testing.assert_array_equal(read_data(tmp_path / "r.csv"), [[5, 1, 2], [5, 3, 4]])


def test_csv_with_the_pandas_index_of_a_split_is_refused(tmp_path):
    """train_test_split(df)[0].to_csv(path) writes the rows' original labels (19, 7, 142, ..)
    as an unnamed first column: it was read as a feature, so `cpadgn fit` trained on row
    numbers without a word.  Refused like the index 0, 1, 2, .. of a whole frame."""
    import pandas as pd
    X = np.arange(20.0).reshape(5, 4) / 7
    df = pd.DataFrame(X, columns=list("abcd")).iloc[[3, 0, 4]]
    df.to_csv(tmp_path / "s.csv")
    with pytest.raises(CpadgnError, match=r"distinct whole numbers \(3, 0, 4, \.\.\): it looks like a "
                                          r"pandas index.*index=False"):
        read_data(tmp_path / "s.csv")
    df.to_csv(tmp_path / "n.csv", index=False)
    np.testing.assert_array_equal(read_data(tmp_path / "n.csv"), X[[3, 0, 4]])


def test_csv_with_a_pandas_index_named_unnamed_is_refused(tmp_path):
    """read_csv of a file written with its index names that column 'Unnamed: 0'; written again
    with index=False (the usual round trip), the index became a named column, and `cpadgn fit`
    trained on row numbers (wine: 36x the median column's std, only a scale warning).  Refused
    like the unnamed index; a named column of other data, or named otherwise, stays a feature."""
    import pandas as pd
    X = np.arange(20.0).reshape(5, 4) / 7
    df = pd.DataFrame(X, columns=list("abcd"))
    for frame, shown in ((df, "counts the rows 0, 1, 2"), (df.iloc[[3, 0, 4]], r"holds distinct whole numbers \(3, 0, 4")):
        frame.to_csv(tmp_path / "i.csv")
        pd.read_csv(tmp_path / "i.csv").to_csv(tmp_path / "u.csv", index=False)
        assert (tmp_path / "u.csv").read_text().startswith("Unnamed: 0,a,")
        with pytest.raises(CpadgnError, match=r"the first column is named 'Unnamed: 0', pandas' name for a column "
                                              rf"that had none, and {shown}.*index=False.*"):
            read_data(tmp_path / "u.csv")
    (tmp_path / "k.csv").write_text("Unnamed: 0,a,b\n5.5,1,2\n6,3,4\n")      # not whole numbers: data
    np.testing.assert_array_equal(read_data(tmp_path / "k.csv"), [[5.5, 1, 2], [6, 3, 4]])
    (tmp_path / "n.csv").write_text("id,a,b\n0,1,2\n1,3,4\n")              # named by the user: a feature
    np.testing.assert_array_equal(read_data(tmp_path / "n.csv"), [[0, 1, 2], [1, 3, 4]])


def test_csv_missing_values(tmp_path):
    (tmp_path / "m.csv").write_text("x,y,z\n1,,3\nNA,nan,N/A\n NaN , null ,2\n")
    X = read_data(tmp_path / "m.csv")
    assert X.shape == (3, 3)
    np.testing.assert_array_equal(np.isnan(X), [[0, 1, 0], [1, 1, 1], [1, 1, 0]])
    assert X[0, 0] == 1 and X[2, 2] == 2


def test_csv_pandas_missing_markers(tmp_path):
    """Every default missing-value marker of pandas.read_csv is a missing value, in any case;
    a first row of numbers with one of them is data, not a header."""
    import pandas as pd
    markers = sorted(pd._libs.parsers.STR_NA_VALUES)
    (tmp_path / "p.csv").write_text("3,None,4\n" + "".join(f"1,{m},2\n" for m in markers) + "1,nOnE,2\n")
    X = read_data(tmp_path / "p.csv")
    assert X.shape == (len(markers) + 2, 3)
    np.testing.assert_array_equal(np.isnan(X), [[0, 1, 0]] * X.shape[0])
    np.testing.assert_array_equal(X[:, [0, 2]], [[3, 4]] + [[1, 2]] * (len(markers) + 1))


def test_csv_row_of_empty_cells_is_an_all_missing_row(tmp_path):
    """pandas writes a row with every value missing as a line of bare commas, or as "" in a
    one-column file: it is a data row (all NaN), unlike a blank line; the rows after it keep
    their positions."""
    import pandas as pd
    X = np.array([[1.0, 2, 3], [np.nan] * 3, [4, np.nan, 6], [7, 8, 9]])
    pd.DataFrame(X, columns=["a", "b", "c"]).to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "q.csv").write_text("1,2,3\n\n,,\n  \n4,,6\n7,8,9\n")
    for name in ("p.csv", "q.csv"):
        np.testing.assert_array_equal(read_data(tmp_path / name), X)
    one = np.array([[1.0], [np.nan], [3.0]])              # one column: pandas quotes the gap ("")
    pd.DataFrame(one, columns=["a"]).to_csv(tmp_path / "o.csv", index=False)
    (tmp_path / "b.csv").write_text('1\n\n""\n3\n\n')
    for name in ("o.csv", "b.csv"):
        np.testing.assert_array_equal(read_data(tmp_path / name), one)


def test_csv_text_column_is_named_and_its_removal_asked(tmp_path):
    """A label column (load_wine's class names written beside the features) was reported as
    one bad cell, 'leave the cell empty or write NA for a missing value': the advice for a
    stray marker, not for a whole column of text.  The column is named, and dropping it asked."""
    (tmp_path / "l.csv").write_text("a,b,label\n1,2,class_0\n3,4,NA\n5,6,class_1\n")
    with pytest.raises(CpadgnError, match=r"column 3 \('label'\) holds text in every row \('class_0' on "
                                          r"line 2\), not numbers: .*drop that column"):
        read_data(tmp_path / "l.csv")


def test_csv_utf8_bom_header(tmp_path):
    (tmp_path / "b.csv").write_bytes("\ufeffa,b\n1,2\n".encode("utf-8"))
    np.testing.assert_array_equal(read_data(tmp_path / "b.csv"), [[1, 2]])


@pytest.mark.parametrize("text,match", [
    ("a,b\n1,2\n3,inf\n", r"row 2 \(line 3\), column 2 is inf; replace it with a finite value"),
    ("1,2\n-inf,4\n5,1e999\n", r"row 2 \(line 2\), column 1 is -inf \(2 infinite values"),
    ("a,b\n1,2\n3,x7\n", r"line 3, column 2 \('b'\) is 'x7', not a number; leave the cell empty"),
    ("a,b\n1,2\n3,1_0\n", r"line 3, column 2 \('b'\) is '1_0', not a number"),     # float('1_0') == 10.0
    # a spreadsheet's quoted numbers: thousands separators (load_wine's proline), decimal commas;
    # they were a bad missing-value marker, or in a column of them a label column to drop
    ('a,b\n1,"735.00"\n3,"1,065.00"\n', r"line 3, column 2 \('b'\) is '1,065.00', not a number; write numbers "
                                          r"without thousands separators \('1065.00'\)"),
    ('a,b\n1,"1,065"\n3,"-12,345,678.5"\n', r"column 2 \('b'\) is '1,065', not a number; write numbers without "
                                             r"thousands separators \('1065'\)"),
    ('a,b\n1,"0,5"\n3,"2,25"\n', r"column 2 \('b'\) is '0,5', not a number; write numbers with a decimal "
                                   r"point \('0.5'\)"),
    ('1,"1,065.00"\n3,"735.00"\n', r"line 1, column 2 is '1,065.00', not a number; write numbers without "
                                  r"thousands separators"),
    # two CSV files joined with cat: the second header was 'a', not a number, a missing-value marker
    ("a,b\n1,2\na,b\n3,4\n", r"line 3 repeats the header \(files joined together\?\); remove that line"),
    ("a,b\n1;2\n", r"line 2 has 1 values but the header has 2"),
    ("1;2\n3;4\n", r"line 1 is separated by semicolons; cpadgn reads comma-separated"),
    ("a\tb\n3\t4\n", r"separated by tabs"),
    ("a,b,c\n1,2,3\n4,5\n", r"line 3 has 2 values but the header has 3"),
    ("1,2,3\n4,5\n", r"line 2 has 2 values but line 1 has 3"),
    ("a,b\n", "header but no data rows"),
    ("\n\n", "no data rows"),
])
def test_csv_errors(tmp_path, text, match):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(CpadgnError, match=match):
        read_data(p)


def test_csv_not_text(tmp_path):
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81\x82")
    with pytest.raises(CpadgnError, match="not a UTF-8 text file"):
        read_data(tmp_path / "bin.csv")


# ------------------------------------------------------------------ reading npy
def test_npy(tmp_path):
    X = np.arange(12, dtype=np.int32).reshape(4, 3)
    np.save(tmp_path / "x.npy", X)
    np.testing.assert_array_equal(read_data(tmp_path / "x.npy"), X)
    X = np.array([[1.0, np.nan], [3.0, 4.0]])
    np.save(tmp_path / "n.npy", X)
    np.testing.assert_array_equal(read_data(tmp_path / "n.npy"), X)


@pytest.mark.parametrize("array,match", [
    (np.arange(5.0), r"1-D array of shape \(5,\); expected a 2-D table.*reshape\(-1, 1\)"),
    (np.zeros((2, 3, 4)), "3-D array"),
    (np.zeros((0, 3)), "no data rows"),
    (np.zeros((3, 0)), "no columns"),
    (np.array([[1.0, 2.0], [3.0, np.inf]]), r"row 2, column 2 is inf"),
    (np.array([["a", "b"]]), "holds text values; expected numbers: save the table as a numeric"),
    (np.array([[1 + 2j]]), "complex"),
    (np.array([[object()]], dtype=object), "pickled"),
])
def test_npy_errors(tmp_path, array, match):
    p = tmp_path / "bad.npy"
    np.save(p, array, allow_pickle=True)
    with pytest.raises(CpadgnError, match=match):
        read_data(p)


def test_npy_corrupt_and_npz(tmp_path):
    (tmp_path / "c.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CpadgnError, match="not a valid .npy file"):
        read_data(tmp_path / "c.npy")
    np.savez(tmp_path / "z.npz", a=np.zeros((2, 2)))
    (tmp_path / "z.npz").rename(tmp_path / "z.npy")
    with pytest.raises(CpadgnError, match="npz archive"):
        read_data(tmp_path / "z.npy")


# ------------------------------------------------------------------- reading h5
def test_h5_dataset_selection(tmp_path):
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f["train"] = np.ones((4, 2))
        f["meta/labels"] = np.arange(4)
    np.testing.assert_array_equal(read_data(p), np.ones((4, 2)))   # the only 2-D dataset
    with h5py.File(p, "a") as f:
        f["group/test"] = np.zeros((3, 2))
    with pytest.raises(CpadgnError, match=r"several 2-D datasets; choose one with --dataset KEY "
                                          r"\(datasets: .*group/test \(3, 2\).*train \(4, 2\)"):
        read_data(p)
    np.testing.assert_array_equal(read_data(p, dataset="group/test"), np.zeros((3, 2)))
    np.testing.assert_array_equal(read_data(p, dataset="/train"), np.ones((4, 2)))
    with pytest.raises(CpadgnError, match=r"no dataset 'nope'; give one of its datasets with --dataset KEY "
                                          r"\(datasets: .*train"):
        read_data(p, dataset="nope")
    import cpadgn.dask
    with pytest.raises(CpadgnError, match=r"no dataset 'nope'; give one of its datasets with --dataset KEY"):
        cpadgn.dask.open_rows(p, dataset="nope")
    with pytest.raises(CpadgnError, match="1-D array"):
        read_data(p, dataset="meta/labels")


def test_h5_no_2d_and_corrupt(tmp_path):
    p = tmp_path / "d.hdf5"
    with h5py.File(p, "w") as f:
        f["v"] = np.ones(3)
    with pytest.raises(CpadgnError, match="no 2-D numeric dataset"):
        read_data(p)
    (tmp_path / "c.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(CpadgnError, match="not a readable HDF5 file"):
        read_data(tmp_path / "c.h5")
    (tmp_path / "t.h5").write_text("just text")
    with pytest.raises(CpadgnError, match="not a readable HDF5 file"):
        read_data(tmp_path / "t.h5")


def test_an_h5_input_another_process_has_open_for_writing_is_named_as_such(tmp_path):
    """HDF5's file lock refused a data or model file that another process held open for
    writing (h5py mode 'r+' or 'a'), and cpadgn called it "a corrupt or truncated HDF5
    file ... re-save or re-download the model": the file was fine."""
    import os
    import subprocess
    import sys

    from cpadgn.modelfile import read_model, save_model
    from cpadgn.network import PiecewiseAffineNet
    rng = np.random.default_rng(0)
    data, model = tmp_path / "d.h5", tmp_path / "m.h5"
    with h5py.File(data, "w") as f:
        f["x"] = rng.normal(size=(4, 3))
    save_model(model, PiecewiseAffineNet.from_arrays([rng.normal(size=(5, 2)), rng.normal(size=(3, 5))],
                                                     [rng.normal(size=5), rng.normal(size=3)], [0.1]),
               noise_std=0.5)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, time\n"
                               f"a = h5py.File({str(data)!r}, 'r+')\nb = h5py.File({str(model)!r}, 'r+')\n"
                               "print('open', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "HDF5_USE_FILE_LOCKING": "TRUE"})
    try:
        assert holder.stdout.readline().strip() == "open"
        for read, path in ((read_data, data), (read_model, model)):
            with pytest.raises(CpadgnError, match=r"is open for writing in another process \(HDF5 file lock\)"):
                read(path)
    finally:
        holder.kill()
        holder.wait()
    assert read_data(data).shape == (4, 3) and read_model(model) is not None     # fine once closed


def test_general_read_errors(tmp_path):
    with pytest.raises(CpadgnError, match="does not exist"):
        read_data(tmp_path / "nope.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(CpadgnError, match="is empty"):
        read_data(tmp_path / "e.csv")
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(CpadgnError, match=r"unknown data extension '.parquet'; supported: .csv, .npy"):
        read_data(tmp_path / "x.parquet")
    with pytest.raises(CpadgnError, match="is a directory"):
        read_data(tmp_path)


# ---------------------------------------------------------------------- writing
def columns():
    return {"log_prob": np.array([-1.5, 0.1, np.nan, -1e-300]), "region": np.array([3, 0, 7, 1]),
            "outlier": np.array([True, False, False, True])}


def test_write_table_csv_exact_round_trip(tmp_path):
    p = tmp_path / "out.csv"
    write_table(p, columns())
    with open(p) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["log_prob", "region", "outlier"]
    assert rows[1] == ["-1.5", "3", "1"] and rows[3] == ["nan", "7", "0"]
    X = read_data(p)
    np.testing.assert_array_equal(X[:, 0], columns()["log_prob"])   # exact, NaN included
    rng = np.random.default_rng(0)
    v = rng.normal(size=100) * 10.0 ** rng.integers(-300, 300, size=100)
    write_table(p, {"v": v})
    np.testing.assert_array_equal(read_data(p)[:, 0], v)


def test_write_table_npy_and_h5(tmp_path):
    cols = columns()
    write_table(tmp_path / "o.npy", cols)
    rec = np.load(tmp_path / "o.npy", allow_pickle=False)
    assert rec.dtype.names == ("log_prob", "region", "outlier")
    np.testing.assert_array_equal(rec["region"], cols["region"])
    np.testing.assert_array_equal(read_data(tmp_path / "o.npy")[:, 1], cols["region"])
    write_table(tmp_path / "o.h5", cols)
    with h5py.File(tmp_path / "o.h5") as f:
        assert list(f.attrs["columns"]) == ["log_prob", "region", "outlier"]
        np.testing.assert_array_equal(f["log_prob"][()], cols["log_prob"])
        assert f["outlier"].dtype == bool


def test_write_array(tmp_path):
    X = np.random.default_rng(1).normal(size=(5, 3))
    X[1, 2] = np.nan
    for suffix in (".csv", ".npy", ".h5"):
        p = tmp_path / f"imp{suffix}"
        write_array(p, X, columns=["a", "b", "c"])
        np.testing.assert_array_equal(read_data(p), X)
    draws = np.stack([X, X + 1])
    write_array(tmp_path / "d.npy", draws)
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), draws)
    write_array(tmp_path / "d.h5", draws)
    with h5py.File(tmp_path / "d.h5") as f:
        np.testing.assert_array_equal(f["data"][()], draws)
    with pytest.raises(CpadgnError, match="CSV file holds a 2-D table"):
        write_array(tmp_path / "d.csv", draws)
    assert not (tmp_path / "d.csv").exists()


def test_writes_are_atomic(tmp_path, monkeypatch):
    p = tmp_path / "out.csv"
    write_table(p, {"a": np.arange(3.0)})
    before = p.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("simulated crash mid-write")

    bad = {"a": np.array([1.0, 2.0, 3.0])}
    monkeypatch.setattr(data_mod, "_formatter", lambda v: boom)   # fails on the first value
    with pytest.raises(RuntimeError):
        write_table(p, bad)
    assert p.read_bytes() == before
    with pytest.raises(RuntimeError):
        write_table(tmp_path / "new.csv", bad)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.csv"]
    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(RuntimeError):
        write_array(tmp_path / "a.npy", np.zeros((2, 2)))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.csv"]


def test_output_file_permissions_follow_umask(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        write_table(tmp_path / "o.csv", {"a": np.arange(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "o.csv").stat().st_mode & 0o777 == 0o644


def test_check_output_path(tmp_path, monkeypatch):
    assert check_output_path(tmp_path / "ok.csv") == tmp_path / "ok.csv"
    assert not (tmp_path / "ok.csv").exists()
    assert list(tmp_path.iterdir()) == []         # the probe file is removed
    with pytest.raises(CpadgnError, match=r"unknown output extension '.xlsx'; use one of .csv"):
        check_output_path(tmp_path / "out.xlsx")
    with pytest.raises(CpadgnError, match="unknown output extension '\\(none\\)'"):
        check_output_path(tmp_path / "out")
    with pytest.raises(CpadgnError, match="directory .* does not exist; create it first"):
        check_output_path(tmp_path / "missing" / "out.csv")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CpadgnError, match="is not a directory"):
        check_output_path(tmp_path / "file.txt" / "out.csv")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(CpadgnError, match="it is a directory"):
        check_output_path(tmp_path / "dir.csv")
    with pytest.raises(CpadgnError, match="3-D; use .npy or .h5"):
        check_output_path(tmp_path / "draws.csv", ndim=3)
    assert check_output_path(tmp_path / "draws.h5", ndim=3)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data_mod.tempfile, "mkstemp", denied)
    with pytest.raises(CpadgnError, match="is not writable \\(Permission denied\\)"):
        check_output_path(tmp_path / "ok.csv")


def test_trailing_commas_are_refused_with_the_fix(tmp_path):
    """A CSV whose every line ends with ',' (some spreadsheet exports) read as D + 1
    columns, the last unnamed and empty, and the model then refused 'the data has 4
    columns but the generator outputs 3' without saying why.  The refusal names the
    trailing commas; without them the file reads back the array.  A named last column
    that is entirely missing stays data."""
    X = np.arange(6.0).reshape(2, 3)
    (tmp_path / "t.csv").write_text("a,b,c,\n0,1,2,\n3,4,5,\n")
    with pytest.raises(CpadgnError, match="ends with a comma.*remove the trailing commas"):
        read_data(tmp_path / "t.csv")
    (tmp_path / "ok.csv").write_text("a,b,c\n0,1,2\n3,4,5\n")
    np.testing.assert_array_equal(read_data(tmp_path / "ok.csv"), X)
    (tmp_path / "named.csv").write_text("a,b,c,d\n0,1,2,\n3,4,5,\n")
    got = read_data(tmp_path / "named.csv")
    np.testing.assert_array_equal(got[:, :3], X)
    assert np.isnan(got[:, 3]).all()


# ------------------------------------------------------------------ rows given in Python
def test_python_rows_with_pandas_na_and_torch_tensors_that_require_grad():
    """A pandas frame of a nullable dtype ("Float64", pd.NA for missing) and a torch tensor
    that requires grad are scored like the NaN array they hold, by log_prob, compare and
    fit_em; they raised numpy's TypeError or torch's RuntimeError from deep inside.
    Oracle: the closed-form Gaussian marginal of the observed entries of a linear model."""
    import pandas as pd
    import torch
    from scipy.stats import multivariate_normal

    import cpadgn
    from cpadgn.fit import fit_em
    from oracles import kappa_rounding_tol, random_linear_model

    rng = np.random.default_rng(3)
    model, A, b, mu, cov_z, sigma = random_linear_model(rng, 1, 3, 0.8)
    X = rng.normal(size=(6, 3))
    X[0, 1] = X[2, 0] = np.nan
    cov_x = A @ cov_z @ A.T + np.diag(sigma ** 2)
    want = [multivariate_normal(A[o] @ mu + b[o], cov_x[np.ix_(o, o)]).logpdf(x[o])
            for x in X for o in [~np.isnan(x)]]
    frame = pd.DataFrame(X).astype("Float64").mask(np.isnan(X), pd.NA)
    assert frame.isna().to_numpy().sum() == 2 and frame.dtypes.iloc[0] == "Float64"
    tensor = torch.tensor(X, requires_grad=True) * 1.0
    # cpadgn's rounding (the derived bound, 3e-12 to 6e-11 on these rows) and scipy's
    # (a few operations on terms of size |log p|)
    tol = kappa_rounding_tol(model, X, model.posterior(X)) + 8 * np.finfo(float).eps * (1 + np.abs(want))
    for rows in (frame, tensor):
        assert np.all(np.abs(model.log_prob(rows) - want) <= tol)
        assert np.array_equal(np.isnan(model.impute(rows)), np.zeros_like(X, dtype=bool))
    res = cpadgn.compare({"linear": model}, frame, frame)
    assert abs(res.models[0].mean_log_likelihood - np.mean(want)) <= tol.mean() + 6 * np.finfo(float).eps * np.abs(want).max()
    assert fit_em(frame, 1, hidden=(), max_iter=1).net.output_dim == 3
    with pytest.raises(CpadgnError, match=r"not a numeric array .*pass an \(N, 3\) array of numbers"):
        model.log_prob(pd.DataFrame([["a", 1.0, 2.0]]))


def test_python_rows_as_a_masked_array_or_a_bfloat16_tensor():
    """numpy's masked array marks missing entries by its mask: they were scored by the
    values under the mask (the mask ignored, silently); a bfloat16 tensor (a torch model's
    usual output) was refused as 'not a numeric array (Got unsupported ScalarType
    BFloat16)'.  Oracle: the closed-form Gaussian marginal of the observed entries of a
    linear model, at the values the rows hold (bfloat16 values are exact in float64)."""
    import torch
    from scipy.stats import multivariate_normal

    from oracles import kappa_rounding_tol, random_linear_model

    rng = np.random.default_rng(4)
    model, A, b, mu, cov_z, sigma = random_linear_model(rng, 1, 3, 0.8)
    cov_x = A @ cov_z @ A.T + np.diag(sigma ** 2)

    def exact(X):
        return np.array([multivariate_normal(A[o] @ mu + b[o], cov_x[np.ix_(o, o)]).logpdf(x[o])
                         for x in X for o in [~np.isnan(x)]])

    X = rng.normal(size=(5, 3))
    mask = np.zeros_like(X, dtype=bool)
    mask[0, 1] = mask[3, 0] = mask[3, 2] = True
    Xn = np.where(mask, np.nan, X)
    Xb = torch.tensor(X, dtype=torch.bfloat16)
    Xbf = Xb.double().numpy()
    X32 = X.astype(np.float32)
    for rows, held in ((np.ma.masked_array(X, mask), Xn),
                       (np.ma.masked_array(X32, mask), np.where(mask, np.nan, X32.astype(np.float64))),
                       (Xb, Xbf)):
        want = exact(np.asarray(held, dtype=np.float64))
        tol = kappa_rounding_tol(model, held, model.posterior(held)) + 8 * np.finfo(float).eps * (1 + np.abs(want))
        assert np.all(np.abs(model.log_prob(rows) - want) <= tol)
    filled = model.impute(np.ma.masked_array(X, mask))
    assert np.array_equal(filled[~mask], X[~mask]) and not np.allclose(filled[mask], X[mask])
