"""Command-line input: invalid input exits with status 2 and one line before any model loads; slide folders."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest

from napari_anopilad.cli import CommandError, OutputFolders, main, prepare_output_folder


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _error_line(command: str, stderr: str) -> str:
    """Return the one line a failed command printed to stderr, checking that it is one line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"anopilad {command}: error: ")
    return lines[0]


def _bundle_with(source: Path, target: Path, section: str, key: str, value: object) -> Path:
    """Copy the bundle at ``source`` to ``target`` with one value of bundle.json replaced."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".cache"))
    spec = json.loads((target / "bundle.json").read_text())
    spec[section][key] = value
    (target / "bundle.json").write_text(json.dumps(spec))
    return target


@pytest.fixture
def regular_file(tmp_path: Path) -> Path:
    path = tmp_path / "results.txt"
    path.write_text("not a folder\n")
    return path


def test_prepare_output_folder_creates_nested(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"

    assert prepare_output_folder(folder, "--out") == folder
    assert folder.is_dir()
    assert list(folder.iterdir()) == []


def test_prepare_output_folder_rejects_file(regular_file: Path) -> None:
    with pytest.raises(CommandError, match=r"^--out .*results.txt is a file, not a folder"):
        prepare_output_folder(regular_file, "--out")


def test_prepare_output_folder_rejects_file_parent(regular_file: Path) -> None:
    with pytest.raises(CommandError, match=r"could not be created, because .*results.txt is a file"):
        prepare_output_folder(regular_file / "out", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to folders without write permission")
def test_prepare_output_folder_rejects_read_only(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(CommandError, match=r"^--out .*read-only is not writable \(Permission denied\)"):
            prepare_output_folder(folder, "--out")
        with pytest.raises(CommandError, match=r"could not be created \(Permission denied\)"):
            prepare_output_folder(folder / "out", "--out")
    finally:
        folder.chmod(0o700)


def test_output_folders_keep_written_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "parent" / "empty"

    with pytest.raises(RuntimeError), OutputFolders() as folders:
        folders.prepare(out, "--out")
        folders.prepare(empty, "--store")
        (out / "patches.csv").write_text("row,col\n")
        raise RuntimeError("the work failed")

    assert (out / "patches.csv").is_file()
    assert not (tmp_path / "parent").exists()


def test_output_folders_kept_on_success(tmp_path: Path) -> None:
    with OutputFolders() as folders:
        folders.prepare(tmp_path / "out", "--out")

    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("out_kind", ["file", "inside-file"])
def test_analyze_invalid_out_fails_first(
    out_kind: str,
    regular_file: Path,
    tmp_path: Path,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = regular_file if out_kind == "file" else regular_file / "out"
    store = tmp_path / "store"

    status, stdout, stderr = _run(
        capsys,
        "analyze",
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(out),
        "--store",
        str(store),
        "--device",
        "cpu",
    )

    assert status == 2
    line = _error_line("analyze", stderr)
    assert f"--out {out} " in line
    assert "give a folder path" in line
    assert stdout == ""
    # A writable --store is not created, so no patch was scored before the check.
    assert not store.exists()


def test_analyze_invalid_store_fails_first(
    regular_file: Path,
    tmp_path: Path,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"

    status, _, stderr = _run(
        capsys,
        "analyze",
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(out),
        "--store",
        str(regular_file),
        "--device",
        "cpu",
    )

    assert status == 2
    assert f"--store {regular_file} is a file, not a folder" in _error_line("analyze", stderr)
    # --out was created before --store failed, and is removed again because it stayed empty.
    assert not out.exists()


@pytest.mark.parametrize("failure", ["bundle", "region"])
def test_analyze_failed_check_removes_new_folders(
    failure: str,
    tmp_path: Path,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = demo_bundle_dir
    flags: list[str] = []
    if failure == "bundle":
        bundle = tmp_path / "bundle"
        shutil.copytree(demo_bundle_dir, bundle, ignore=shutil.ignore_patterns(".cache"))
        (bundle / "lora" / "pytorch_lora_weights.safetensors").unlink()
    else:
        flags = ["--region", "900000", "900000", "256", "256"]
    out = tmp_path / "results" / "run-1"
    store = tmp_path / "stores" / "shared"

    status, _, stderr = _run(
        capsys,
        "analyze",
        str(cmu_slide_path),
        "--bundle",
        str(bundle),
        "--out",
        str(out),
        "--store",
        str(store),
        "--device",
        "cpu",
        *flags,
    )

    assert status == 2
    line = _error_line("analyze", stderr)
    assert ("LoRA weights" if failure == "bundle" else "--region 900000 900000 256 256") in line
    # Both folders and their missing parents were created by the output check and are removed again.
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "stores").exists()


def test_analyze_failed_check_keeps_existing_folders(
    tmp_path: Path, cmu_slide_path: Path, demo_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle_with(demo_bundle_dir, tmp_path / "bundle", "settings", "num_inference_steps", 2.5)
    out = tmp_path / "out"
    out.mkdir()
    store = out / "store"

    status, _, stderr = _run(
        capsys,
        "analyze",
        str(cmu_slide_path),
        "--bundle",
        str(bundle),
        "--out",
        str(out),
        "--store",
        str(store),
        "--device",
        "cpu",
    )

    assert status == 2
    assert "num_inference_steps 2.5 is invalid" in _error_line("analyze", stderr)
    assert out.is_dir()
    assert not store.exists()


@pytest.mark.parametrize("store_kind", ["file", "inside-file"])
def test_cohort_invalid_store_fails_first(
    store_kind: str,
    regular_file: Path,
    tmp_path: Path,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = regular_file if store_kind == "file" else regular_file / "store"
    out = tmp_path / "cohort"

    status, stdout, stderr = _run(
        capsys,
        "analyze-cohort",
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(out),
        "--store",
        str(store),
        "--device",
        "cpu",
    )

    assert status == 2
    line = _error_line("analyze-cohort", stderr)
    assert f"--store {store} " in line
    assert "give a folder path" in line
    assert "dask cluster" not in stdout
    # --out was created before the --store check and is removed again because it stayed empty.
    assert not out.exists()


def test_cohort_store_created_before_cluster(tmp_path: Path, demo_bundle_dir: Path) -> None:
    from napari_anopilad.commands.analyze_cohort import build_cohort

    slide = tmp_path / "slide.svs"
    slide.write_bytes(b"")
    store = tmp_path / "stores" / "cohort"
    args = _cohort_args(
        str(slide), "--bundle", str(demo_bundle_dir), "--out", str(tmp_path / "out"), "--store", str(store)
    )

    _, options = build_cohort(args)

    assert store.is_dir()
    assert options.store_root == store


@pytest.mark.parametrize("out_kind", ["file", "inside-file"])
def test_cohort_invalid_out_fails_first(
    out_kind: str,
    regular_file: Path,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = regular_file if out_kind == "file" else regular_file / "out"

    status, stdout, stderr = _run(
        capsys,
        "analyze-cohort",
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(out),
        "--device",
        "cpu",
    )

    assert status == 2
    assert f"--out {out} " in _error_line("analyze-cohort", stderr)
    # The cluster starts after the checks and announces itself on stdout.
    assert "dask cluster" not in stdout


@pytest.mark.parametrize("folder_kind", ["file", "inside-file"])
def test_make_demo_bundle_invalid_folder(
    folder_kind: str, regular_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = regular_file if folder_kind == "file" else regular_file / "bundle"

    status, _, stderr = _run(capsys, "make-demo-bundle", str(folder))

    assert status == 2
    assert f"bundle folder {folder} " in _error_line("make-demo-bundle", stderr)


def test_demo_invalid_out(regular_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, stderr = _run(capsys, "demo", "--out", str(regular_file), "--no-viewer")

    assert status == 2
    assert f"--out {regular_file} is a file" in _error_line("demo", stderr)


def test_analyze_bundle_wrong_type(
    tmp_path: Path, cmu_slide_path: Path, demo_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle_with(demo_bundle_dir, tmp_path / "bundle", "settings", "num_inference_steps", 2.5)

    status, _, stderr = _run(
        capsys,
        "analyze",
        str(cmu_slide_path),
        "--bundle",
        str(bundle),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    )

    assert status == 2
    line = _error_line("analyze", stderr)
    assert f"inference settings in {bundle / 'bundle.json'}: num_inference_steps 2.5 is invalid" in line
    assert line.endswith("use an integer")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_analyze_non_finite_guidance_fails_first(
    value: str,
    tmp_path: Path,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "store"

    status, stdout, stderr = _run(
        capsys,
        "analyze",
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(tmp_path / "out"),
        "--store",
        str(store),
        "--device",
        "cpu",
        f"--guidance-scale={value}",
    )

    assert status == 2
    assert _error_line("analyze", stderr).endswith(
        f"--guidance-scale {value} is invalid: use a finite number"
    )
    assert stdout == ""
    # The output check creates both folders, and the failed setting check removes them again.
    assert not store.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--guidance-scale", "nan"], "--guidance-scale nan is invalid: use a finite number"),
        (["--guidance-scale", "0.5"], "--guidance-scale 0.5 is invalid: use 1 (no guidance) or more"),
        (["--start-timestep", "1000"], "--start-timestep 1000 is invalid: use 0 to 999"),
        (["--steps", "0"], "--steps 0 is invalid: use 1 to 1000"),
    ],
)
def test_cohort_invalid_setting_fails_first(
    flags: list[str],
    message: str,
    tmp_path: Path,
    cmu_slide_path: Path,
    demo_bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, stdout, stderr = _run(
        capsys,
        "analyze-cohort",
        str(cmu_slide_path),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        *flags,
    )

    assert status == 2
    assert _error_line("analyze-cohort", stderr).endswith(message)
    assert "dask cluster" not in stdout


def test_cohort_bundle_wrong_type(
    tmp_path: Path, cmu_slide_path: Path, demo_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle_with(demo_bundle_dir, tmp_path / "bundle", "settings", "guidance_scale", None)

    status, stdout, stderr = _run(
        capsys,
        "analyze-cohort",
        str(cmu_slide_path),
        "--bundle",
        str(bundle),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    )

    assert status == 2
    line = _error_line("analyze-cohort", stderr)
    assert f"inference settings in {bundle / 'bundle.json'}: guidance_scale None is invalid" in line
    assert "dask cluster" not in stdout


def _cohort_args(*argv: str) -> argparse.Namespace:
    from napari_anopilad.commands.analyze_cohort import add_parser

    return add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(list(argv))


def test_cohort_folder_expands_to_slides(tmp_path: Path, demo_bundle_dir: Path) -> None:
    from napari_anopilad.commands.analyze_cohort import build_cohort

    folder = tmp_path / "slides"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.svs", "A.NDPI", "c.ome.tif", "d.tiff", "notes.txt", ".hidden.svs", "sub/e.svs"):
        (folder / name).write_bytes(b"")
    (folder / "f.svs").mkdir()
    listing = tmp_path / "slides.txt"
    listing.write_text("slides\n")
    args = _cohort_args(
        str(folder),
        str(folder / "b.svs"),
        "--list",
        str(listing),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(tmp_path / "out"),
    )

    slides, _ = build_cohort(args)

    # Sorted by name, each file once, although the folder is given twice and b.svs also on its own.
    assert [slide.path for slide in slides] == [
        folder / "A.NDPI",
        folder / "b.svs",
        folder / "c.ome.tif",
        folder / "d.tiff",
    ]


def _cohort_slide_paths(tmp_path: Path, bundle: Path, *slides: str) -> list[Path]:
    from napari_anopilad.commands.analyze_cohort import build_cohort

    args = _cohort_args(*slides, "--bundle", str(bundle), "--out", str(tmp_path / "out"))
    return [slide.path for slide in build_cohort(args)[0]]


def test_cohort_dotdot_path_analysed_once(tmp_path: Path, demo_bundle_dir: Path) -> None:
    folder = tmp_path / "slides"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.svs").write_bytes(b"")
    dotdot = folder / "sub" / ".." / "a.svs"

    paths = _cohort_slide_paths(tmp_path, demo_bundle_dir, str(folder), str(dotdot))

    assert paths == [folder / "a.svs"]


def test_cohort_list_relative_duplicate(tmp_path: Path, demo_bundle_dir: Path) -> None:
    slide = tmp_path / "slides" / "a.svs"
    slide.parent.mkdir()
    slide.write_bytes(b"")
    listing = tmp_path / "lists" / "cohort" / "slides.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text("../../slides/a.svs\n")

    paths = _cohort_slide_paths(tmp_path, demo_bundle_dir, str(slide), "--list", str(listing))

    assert paths == [slide]


def test_cohort_symlink_analysed_once(tmp_path: Path, demo_bundle_dir: Path) -> None:
    slide = tmp_path / "slides" / "a.svs"
    slide.parent.mkdir()
    slide.write_bytes(b"")
    link = tmp_path / "linked.svs"
    link.symlink_to(slide)

    paths = _cohort_slide_paths(tmp_path, demo_bundle_dir, str(link), str(slide.parent))

    # The path given first names the slide, so its output folder is OUT/linked/.
    assert paths == [link]


def test_cohort_distinct_files_kept(tmp_path: Path, demo_bundle_dir: Path) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.svs", "b.svs"):
        (folder / name).write_bytes(b"")
    missing = tmp_path / "absent.svs"

    paths = _cohort_slide_paths(tmp_path, demo_bundle_dir, str(folder), str(missing), str(missing))

    assert paths == [folder / "a.svs", folder / "b.svs", missing]


def test_cohort_missing_file_kept(tmp_path: Path) -> None:
    from napari_anopilad.commands.analyze_cohort import expand_slide_folders

    missing = tmp_path / "absent.svs"

    # A missing slide is not an input error: the cohort reports it as a failed slide.
    assert expand_slide_folders([missing]) == [missing]


def test_cohort_folder_without_slides(
    tmp_path: Path, demo_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no slides here\n")

    status, stdout, stderr = _run(
        capsys,
        "analyze-cohort",
        str(folder),
        "--bundle",
        str(demo_bundle_dir),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    )

    assert status == 2
    line = _error_line("analyze-cohort", stderr)
    assert f"the slide folder {folder} contains no slide file (.svs, .tif, .tiff, .ndpi)" in line
    assert "dask cluster" not in stdout
