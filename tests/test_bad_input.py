"""Bad input: one-line error naming what was wrong, non-zero exit, nothing half-written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dream_export import cli as export_cli
from runtime import cli


def run(capsys, argv):
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.png").write_bytes(b"")
    data = images["astronaut"].read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 3])
    jpg = images["coffee"].read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "notes.png").write_text("this is not an image\n")
    (d / "folder.png").mkdir()
    return d


@pytest.mark.parametrize("name,needle", [
    ("missing.png", "not found"),
    ("empty.png", "empty file"),
    ("truncated.png", "damaged or truncated"),
    ("truncated.jpg", "damaged or truncated"),
    ("notes.png", "not an image"),
    ("folder.png", "not a file"),
])
def test_bad_image_files(zoo, bad_files, capsys, name, needle):
    _, bundle = zoo.get("gqa_nosplit")
    rc, err = run(capsys, [str(bad_files / name), "Describe the image.", "--bundle", str(bundle)])
    assert rc == 2
    assert name in err and needle in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(zoo, images, capsys, prompt):
    _, bundle = zoo.get("gqa_nosplit")
    rc, err = run(capsys, [str(images["coffee"]), prompt, "--bundle", str(bundle)])
    assert rc == 2 and "prompt is empty" in err


def test_prompt_longer_than_context(zoo, images, capsys):
    _, bundle = zoo.get("ctx_small")
    rc, err = run(capsys, [str(images["coffee"]), "word " * 200, "--bundle", str(bundle)])
    assert rc == 2 and "context is 96" in err


def test_bad_generation_arguments(zoo, images, capsys):
    _, bundle = zoo.get("gqa_nosplit")
    rc, err = run(capsys, [str(images["coffee"]), "hi", "--bundle", str(bundle), "--top-p", "1.5"])
    assert rc == 2 and "top_p" in err


@pytest.fixture
def bundle_copy(zoo, tmp_path):
    _, bundle = zoo.get("gqa_nosplit")
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_missing_file(bundle_copy, images, capsys):
    (bundle_copy / "decoder.onnx").unlink()
    rc, err = run(capsys, [str(images["coffee"]), "hi", "--bundle", str(bundle_copy)])
    assert rc == 2 and "decoder.onnx" in err and "missing" in err


def test_bundle_altered_file(bundle_copy, images, capsys):
    path = bundle_copy / "weights.bin"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    rc, err = run(capsys, [str(images["coffee"]), "hi", "--bundle", str(bundle_copy)])
    assert rc == 2 and "weights.bin" in err and "sha256" in err


def _edit_manifest(bundle, edit):
    mpath = bundle / "manifest.json"
    manifest = json.loads(mpath.read_text())
    edit(manifest)
    mpath.write_text(json.dumps(manifest))


@pytest.mark.parametrize("where", ["../outside.onnx", "/tmp/outside.onnx", "unlisted.onnx"])
def test_bundle_graph_outside_or_unlisted_is_refused(bundle_copy, images, capsys, where):
    """A manifest edited to point a graph at a file that the 'files' list does not verify, or outside the folder."""
    outside = bundle_copy.parent / "outside.onnx"
    shutil.copy(bundle_copy / "vision.onnx", outside)
    shutil.copy(bundle_copy / "vision.onnx", bundle_copy / "unlisted.onnx")

    def edit(m):
        m["graphs"]["vision"]["file"] = where
        if where != "unlisted.onnx":
            m["files"][where] = m["files"]["vision.onnx"]  # listed, so only the path rule can refuse it
    _edit_manifest(bundle_copy, edit)
    rc, err = run(capsys, [str(images["coffee"]), "hi", "--bundle", str(bundle_copy)])
    assert rc == 2 and where in err and ("outside the bundle" in err or "not in its 'files' list" in err or "missing" in err)
    assert "\n" not in err


def test_bundle_symlink_out_of_the_folder_is_refused(bundle_copy, images, capsys):
    target = bundle_copy.parent / "elsewhere.bin"
    shutil.move(bundle_copy / "weights.bin", target)
    (bundle_copy / "weights.bin").symlink_to(target)
    rc, err = run(capsys, [str(images["coffee"]), "hi", "--bundle", str(bundle_copy)])
    assert rc == 2 and "weights.bin" in err and "outside the bundle" in err


@pytest.mark.parametrize("location", ["copy.bin", "../elsewhere.bin"])
def test_graph_naming_unverified_external_data_is_refused(bundle_copy, images, capsys, location):
    """The graph's own external-data location (what ONNX Runtime opens) must be a listed file, even when the
    manifest was re-hashed to match the edited graph and still declares weights.bin."""
    import onnx

    from runtime.bundle import sha256_file
    from runtime.onnx_external_data import external_data_locations

    shutil.copy(bundle_copy / "weights.bin", bundle_copy / "copy.bin")
    shutil.copy(bundle_copy / "weights.bin", bundle_copy.parent / "elsewhere.bin")
    graph = bundle_copy / "vision.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    graph.write_bytes(model.SerializeToString())
    assert external_data_locations(graph) == {location}

    def edit(m):
        m["files"]["vision.onnx"] = sha256_file(graph)
    _edit_manifest(bundle_copy, edit)
    rc, err = run(capsys, [str(images["coffee"]), "hi", "--bundle", str(bundle_copy)])
    assert rc == 2 and location in err and ("not a verified file" in err or "outside the bundle" in err)


def test_external_data_walker_agrees_with_onnx(bundle_copy):
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from runtime.onnx_external_data import external_data_locations

    for graph in sorted(bundle_copy.glob("*.onnx")):
        model = onnx.load(str(graph), load_external_data=False)
        want = {e.value for t in _get_all_tensors(model) if uses_external_data(t) for e in t.external_data
                if e.key == "location"}
        assert external_data_locations(graph) == want and want, graph.name


def test_bundle_embeddings_out_of_range_are_refused(bundle_copy, images, capsys):
    _edit_manifest(bundle_copy, lambda m: m["embeddings"].update(offset=10**12))
    rc, err = run(capsys, [str(images["coffee"]), "hi", "--bundle", str(bundle_copy)])
    assert rc == 2 and "weights.bin" in err and "offset" in err


def test_bundle_unknown_format_version(bundle_copy, images, capsys):
    mpath = bundle_copy / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["format_version"] = 99
    mpath.write_text(json.dumps(manifest))
    rc, err = run(capsys, [str(images["coffee"]), "hi", "--bundle", str(bundle_copy)])
    assert rc == 2 and "format_version 99" in err


def test_no_bundle_in_store(images, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DREAM_EXPORT_HOME", str(tmp_path / "empty-store"))
    rc, err = run(capsys, [str(images["coffee"]), "hi"])
    assert rc == 2 and "no bundle" in err


def test_latest_bundle_is_used_and_named(zoo, images, capsys, monkeypatch, tmp_path):
    _, bundle = zoo.get("gqa_nosplit")
    store = tmp_path / "store"
    shutil.copytree(bundle, store / "bundles" / "mine")
    monkeypatch.setenv("DREAM_EXPORT_HOME", str(store))
    capsys.readouterr()
    assert cli.main([str(images["coffee"]), "hi", "--max-new-tokens", "3", "--json"]) == 0
    out = capsys.readouterr()
    assert "using bundle" in out.err and "mine" in out.err
    assert json.loads(out.out)["num_new_tokens"] == 3


def test_export_refuses_existing_output_unless_force(zoo, tmp_path, capsys):
    model_dir, _ = zoo.get("ctx_small")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = export_cli.main(["--model", str(model_dir), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert export_cli.main(["--model", str(model_dir), "--out", str(out), "--force", "--quiet"]) == 0
    assert (out / "manifest.json").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_export_unknown_model_without_network(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc = export_cli.main(["--model", "smolvlm", "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "HuggingFaceTB/SmolVLM-256M-Instruct" in err and "--model DIR" in err
    assert not (tmp_path / "b").exists()


def test_export_folder_without_config(tmp_path, capsys):
    rc = export_cli.main(["--model", str(tmp_path), "--quiet"])
    assert rc == 2 and "config.json" in capsys.readouterr().err


def test_console_script_exit_code(zoo, bad_files):
    _, bundle = zoo.get("gqa_nosplit")
    exe = Path(sys.executable).with_name("dream-run")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime.cli"]
    proc = subprocess.run([*cmd, str(bad_files / "empty.png"), "hi", "--bundle", str(bundle)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("dream-run: error:") and "empty.png" in proc.stderr
