"""Tests for clients.node_data (a node's own data file) and the ClientApp's choice of local data."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from clients.data import load_dataset
from clients.node_data import (
    NodeDataError,
    NodeDataSummary,
    check_compatible,
    inspect_node_data,
    load_node_data,
)
from clients.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]


def one_line_error(path: Path | str, pattern: str, **kwargs) -> str:
    """Load ``path``, expect a one-line NodeDataError matching ``pattern`` that names the file; return it."""
    with pytest.raises(NodeDataError, match=pattern) as info:
        load_node_data(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and Path(path).name in message
    return message


def write_images(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> None:
    """Write grayscale PNGs of the given (width, height) into one subfolder per class name."""
    image = pytest.importorskip("PIL.Image", reason="image folders need Pillow")
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True)
        for i, (width, height) in enumerate(shapes):
            pixels = np.full((height, width), 51 * (i % 6), dtype=np.uint8)
            image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def run_config() -> RunSpec:
    """Return the default run config on the digits dataset (64 features, 10 classes)."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return RunSpec.from_run_config({**table, "dataset": "digits", "model": "logreg"})


# ------------------------------------------------------------------------- formats


def test_csv_loads_features_and_keeps_the_labels(tmp_path: Path) -> None:
    path = tmp_path / "node.csv"
    path.write_text("f1,target,f2\n1.5,7,2\n0,3,3\n-1,7,4\n")

    ds = load_node_data(path, label_column="target")
    summary = inspect_node_data(path, label_column="target")

    assert ds.x.tolist() == [[1.5, 2.0], [0.0, 3.0], [-1.0, 4.0]] and ds.x.dtype == np.float32
    assert ds.y.tolist() == [7, 3, 7] and ds.num_classes == 8
    assert summary == NodeDataSummary(str(path), "csv", 3, (2,), {3: 1, 7: 2})


def test_npz_loads_images_and_tabular_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "img.npz", x=np.ones((4, 8, 8), np.uint8), y=np.array([7, 5, 7, 9]))
    np.savez(tmp_path / "tab.npz", x=np.ones((3, 5)), y=np.array([1.0, 0.0, 1.0]))

    images, table = load_node_data(tmp_path / "img.npz"), load_node_data(tmp_path / "tab.npz")

    assert images.input_shape == (1, 8, 8) and images.y.tolist() == [7, 5, 7, 9]
    assert table.input_shape == (5,) and table.y.tolist() == [1, 0, 1] and table.y.dtype == np.int64


def test_image_folder_loads_grayscale_images_of_one_size(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", {"3": [(6, 4)] * 2, "7": [(6, 4)] * 3})
    (tmp_path / "imgs" / "7" / "README.txt").write_text("ignored: not an image")

    ds = load_node_data(tmp_path / "imgs")  # auto: a folder is an image folder
    summary = inspect_node_data(tmp_path / "imgs")

    assert summary == NodeDataSummary(str(tmp_path / "imgs"), "image-folder", 5, (1, 4, 6), {3: 2, 7: 3})
    assert ds.x.shape == (5, 1, 4, 6) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == pytest.approx(0.4)  # pixel 102 of 255


def test_an_image_folder_of_mixed_sizes_and_colours_keeps_three_channels_at_one_size(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image", reason="image folders need Pillow")
    (tmp_path / "imgs" / "0").mkdir(parents=True)
    (tmp_path / "imgs" / "1").mkdir()
    red = np.zeros((8, 10, 3), np.uint8)
    red[..., 0] = 255
    image.fromarray(red, mode="RGB").save(tmp_path / "imgs" / "0" / "a.png")  # 10x8: the first sets the size
    image.fromarray(np.full((16, 12, 3), (0, 0, 255), np.uint8), mode="RGB").save(tmp_path / "imgs" / "1" / "b.jpg")
    image.fromarray(np.full((5, 5), 255, np.uint8), mode="L").save(tmp_path / "imgs" / "1" / "c.png")

    ds = load_node_data(tmp_path / "imgs")
    resized = load_node_data(tmp_path / "imgs", image_size=(6, 6))

    assert ds.x.shape == (3, 3, 8, 10) and ds.y.tolist() == [0, 1, 1]
    assert ds.x[0, 0].min() == 1.0 and ds.x[0, 1:].max() == 0.0, "red stays in the red channel"
    assert ds.x[1, 2].mean() > 0.95 and ds.x[1, :2].mean() < 0.05, "blue stays blue after resizing"
    assert np.allclose(ds.x[2], 1.0), "a gray image joins as three equal channels"
    assert resized.x.shape == (3, 3, 6, 6)


def test_image_folder_labels(tmp_path: Path) -> None:
    write_images(tmp_path / "numbered", {"3": [(5, 5)] * 2, "12": [(5, 5)] * 3})
    write_images(tmp_path / "named", {"dog": [(5, 5)] * 2, "cat": [(5, 5)] * 3, "bird": []})

    numbered, named = inspect_node_data(tmp_path / "numbered"), inspect_node_data(tmp_path / "named")

    assert numbered.class_counts == {3: 2, 12: 3}  # integer names are the labels
    assert named.class_counts == {1: 3, 2: 2}  # otherwise sorted names, empty ones too: bird 0, cat 1, dog 2


def test_labels_are_not_remapped(tmp_path: Path) -> None:
    np.savez(tmp_path / "node.npz", x=np.zeros((4, 2)), y=np.array([3, 7, 7, 3]))

    ds = load_node_data(tmp_path / "node.npz")
    shipped = load_dataset(str(tmp_path / "node.npz"))  # the run-dataset loader remaps; a node must not

    assert sorted(set(ds.y.tolist())) == [3, 7] and ds.num_classes == 8
    assert sorted(set(shipped.y.tolist())) == [0, 1]


def test_auto_format_needs_a_known_suffix(tmp_path: Path) -> None:
    path = tmp_path / "node.txt"
    path.write_text("label,a\n1,2\n0,3\n")

    one_line_error(path, r"cannot tell the format.*'\.txt'.*set data-format")
    assert load_node_data(path, data_format="csv").y.tolist() == [1, 0]


# -------------------------------------------------------------------------- errors


def test_missing_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "empty.npz").write_bytes(b"")

    one_line_error(tmp_path / "missing.csv", r"does not exist.*data-path")
    one_line_error(tmp_path / "empty.csv", r"is empty \(0 bytes\)")
    one_line_error(tmp_path / "empty.npz", r"is empty \(0 bytes\)")


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "bytes.csv").write_bytes(b"label,a\n\xff\xfe,1\n")
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive at all")
    (tmp_path / "dir.csv").mkdir()

    one_line_error(tmp_path / "bytes.csv", r"not UTF-8 text.*save the CSV as UTF-8")
    one_line_error(tmp_path / "junk.npz", r"cannot be read as npz")
    one_line_error(tmp_path / "dir.csv", r"is not a file.*image-folder", data_format="csv")


def test_csv_content_errors(tmp_path: Path) -> None:
    (tmp_path / "nolabel.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "inf.csv").write_text("label,a,b\n1,2,3\n0,4,inf\n")
    (tmp_path / "nolabelcell.csv").write_text("label,a\n1,2\n,4\n")
    (tmp_path / "ragged.csv").write_text("label,a\n1,2\n0,4,5\n")
    (tmp_path / "header.csv").write_text("label,a\n")
    (tmp_path / "one.csv").write_text("label,a\n1,2\n")
    (tmp_path / "neg.csv").write_text("label,a\n1,2\n-1,4\n")
    (tmp_path / "names.csv").write_text("label,a\ncat,2\ndog,4\n")

    one_line_error(tmp_path / "nolabel.csv",
                   r"no label column 'label' \(columns: a, b\).*--label-column for `fedcompare node start`")
    one_line_error(tmp_path / "inf.csv", r"line 3 column 'b' holds 'inf'; replace infinite values")
    one_line_error(tmp_path / "nolabelcell.csv", r"line 3 has no label; label or drop the row")
    one_line_error(tmp_path / "ragged.csv", r"line 3 has 3 fields, expected 2.*fix the row")
    one_line_error(tmp_path / "header.csv", r"no data rows")
    one_line_error(tmp_path / "one.csv", r"has 1 example\(s\), expected at least 2.*add examples")
    one_line_error(tmp_path / "neg.csv", r"column 'label' line 3 is '-1', expected a non-negative integer")
    one_line_error(tmp_path / "names.csv", r"line 2 is 'cat', expected a non-negative integer")


def test_npz_content_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", features=np.ones((3, 2)), y=np.arange(3))
    np.savez(tmp_path / "noy.npz", x=np.ones((3, 2)))
    np.savez(tmp_path / "short.npz", x=np.ones((3, 2)), y=np.arange(2))
    np.savez(tmp_path / "inf.npz", x=np.array([[1.0], [np.inf]]), y=np.arange(2))
    np.savez(tmp_path / "frac.npz", x=np.ones((2, 2)), y=np.array([0.5, 1.0]))

    one_line_error(tmp_path / "nox.npz", r"lacks array\(s\) x .*np\.savez")
    one_line_error(tmp_path / "noy.npz", r"lacks array\(s\) y .*np\.savez")
    one_line_error(tmp_path / "short.npz", r"got x \(3, 2\) and y \(2,\); save one label per example")
    one_line_error(tmp_path / "inf.npz", r"infinite feature value \(example 1\)")
    one_line_error(tmp_path / "frac.npz", r"array 'y' example 0 is 0.5, expected a non-negative integer")


def test_image_folder_errors(tmp_path: Path) -> None:
    write_images(tmp_path / "mixed", {"0": [(5, 5), (5, 5)], "1": [(5, 5), (6, 5)]})
    (tmp_path / "flat").mkdir()
    (tmp_path / "hollow" / "0").mkdir(parents=True)
    write_images(tmp_path / "broken", {"0": [(5, 5)] * 2})
    (tmp_path / "broken" / "0" / "bad.png").write_bytes(b"not a png")

    one_line_error(tmp_path / "mixed", r"image size 3x3 is too small; use at least 4x4 pixels \(data.image_size\)",
                   image_size=(3, 3))
    one_line_error(tmp_path / "flat", r"no class subfolders")
    one_line_error(tmp_path / "hollow", r"holds no images")
    one_line_error(tmp_path / "broken", r"bad\.png' cannot be read.*replace or remove")


# ----------------------------------------------------------------- compatibility


def test_check_compatible_accepts_a_fitting_node_and_rejects_both_mismatches() -> None:
    fitting = NodeDataSummary("n.npz", "npz", 4, (64,), {3: 2, 7: 2})
    wide = NodeDataSummary("n.npz", "npz", 4, (65,), {3: 2, 7: 2})
    high = NodeDataSummary("n.npz", "npz", 4, (64,), {3: 2, 10: 1, 12: 1})

    check_compatible(fitting, input_shape=(64,), num_classes=10)
    with pytest.raises(NodeDataError, match=r"n\.npz.*expected \(64,\), got \(65,\)"):
        check_compatible(wide, input_shape=(64,), num_classes=10)
    with pytest.raises(NodeDataError, match=r"n\.npz.*labels must lie in 0\.\.9.*got 10, 12"):
        check_compatible(high, input_shape=(64,), num_classes=10)


def test_node_data_preprocessing_and_images_import_no_torch_flower_prefect_or_minio() -> None:
    code = (
        "import sys, clients.node_data, clients.preprocess, clients.images\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'flwr', 'prefect', 'minio'}))\n"
    )

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


# -------------------------------------------------------- the ClientApp's local data


def digits_file(path: Path, *, classes: tuple[int, ...] = (3, 7), width: int = 64) -> Path:
    """Write the digits examples of ``classes`` (first ``width`` features) to an .npz node file."""
    digits = load_dataset("digits")
    keep = np.isin(digits.y, classes)
    np.savez(path, x=digits.x[keep][:, :width], y=digits.y[keep])
    return path


def test_a_node_with_data_path_splits_its_own_file(tmp_path: Path, run_config: RunSpec) -> None:
    from clients.node_tasks import local_splits, node_facts

    path = digits_file(tmp_path / "own.npz")
    node_config = {"data-path": str(path), "tier": "cpu"}

    train, test = local_splits(node_config, run_config)
    again = local_splits(node_config, run_config)
    facts = node_facts(node_config)

    assert len(train) + len(test) == 362 and abs(len(test) - 0.15 * 362) < 1  # run's local-test-fraction
    assert set(np.unique(train.y)) == {3, 7} and set(np.unique(test.y)) == {3, 7}  # stratified, not remapped
    assert train.num_classes == 10 and train.input_shape == (64,)  # the run's classes, for the model
    assert np.array_equal(train.x, again[0].x)  # seeded by the run's seed
    assert facts.partition_id < 0 and facts.num_partitions == 0 and facts.data_id.startswith("file-")
    assert node_facts(dict(node_config)).partition_id == facts.partition_id  # stable across restarts


def test_a_node_without_data_path_takes_its_partition(run_config: RunSpec) -> None:
    from clients.node_tasks import local_splits, node_facts
    from clients.data import node_data

    node_config = {"partition-id": 1, "num-partitions": 3}

    train, _ = local_splits(node_config, run_config)
    expected, _ = node_data(load_dataset("digits"), partition_id=1, num_partitions=3, **run_config.data_kwargs())

    assert np.array_equal(train.x, expected.x) and np.array_equal(train.y, expected.y)
    assert node_facts(node_config).data_id == "partition-1-of-3"
    with pytest.raises(ValueError, match="neither data-path nor partition-id"):
        node_facts({"tier": "cpu"})


def test_a_node_file_that_does_not_fit_the_run_is_refused(tmp_path: Path, run_config: RunSpec) -> None:
    from clients.node_tasks import local_splits

    narrow = digits_file(tmp_path / "narrow.npz", width=60)
    np.savez(tmp_path / "eleven.npz", x=np.zeros((4, 64)), y=np.array([0, 11, 0, 11]))

    with pytest.raises(NodeDataError, match=r"narrow\.npz.*expected \(64,\), got \(60,\)"):
        local_splits({"data-path": str(narrow)}, run_config)
    with pytest.raises(NodeDataError, match=r"eleven\.npz.*got 11"):
        local_splits({"data-path": str(tmp_path / "eleven.npz")}, run_config)


def test_the_query_reply_of_a_data_path_node_holds_counts_only(
    tmp_path: Path, run_config: RunSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients.client_app import query

    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():  # what a ClientApp process has set
        monkeypatch.setattr(TaskIdentity, name, value)
    run = run_config.to_run_config()
    path = digits_file(tmp_path / "own.npz")
    context = Context(run_id=1, node_id=0, node_config={"data-path": str(path), "tier": "cpu", "device": "cpu"},
                      state=RecordDict(), run_config=run)
    asked = Message(RecordDict({"query": ConfigRecord({"what": "node-info"})}), dst_node_id=0, message_type="query")

    info = dict(query(asked, context).content["node"])

    assert info["data-source"] == "node-file" and info["data-id"].startswith("file-")
    assert info["partition-id"] < 0 and info["num-partitions"] == 0
    assert info["num-train"] + info["num-test"] == 362 and info["classes-seen"] == 2
    assert info["memory-mb"] > 0 and "gpu-name" not in info


def test_a_cuda_node_reports_its_gpu_name_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    torch = pytest.importorskip("torch", reason="the GPU facts come from torch.cuda")
    from clients.node_tasks import gpu_facts

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: asked.append(index) or SimpleNamespace(name="H100", total_memory=80 * 2**30))

    assert gpu_facts("cpu") == {}
    assert gpu_facts("cuda:1") == {"gpu-name": "H100", "gpu-memory-mb": 80 * 1024.0} and asked == [1]
