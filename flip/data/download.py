"""Fetch a dataset's official files, or take them from a mirror directory; verify; record a manifest.

* With a mirror (``FLIP_DATA_MIRROR`` or ``data.mirror``) nothing is downloaded: the files are
  taken from ``<mirror>/<dataset dir>/`` (hard link where possible, else copy).
* Otherwise each archive is downloaded with a progress bar, resumed from a ``.part`` file after an
  interruption (HTTP Range), checked against its published checksum (datasets whose publisher gives
  none get theirs recorded on first download and checked from then on), and unpacked.
* Without network and without a mirror the error says exactly which files to put where.

The output directory holds the raw files and ``manifest.json`` (file sizes and SHA-256).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from flip.config import Config
from flip.data.sources import get_source
from flip.data.sources.base import Download, SourceInfo, find_raw
from flip.errors import DataError, TransientError
from flip.io import atomic_file, read_json, write_json


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same filesystem) or copy it, atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _where_to_put(info: SourceInfo, out: Path) -> str:
    names = ", ".join(f.name for f in info.files)
    urls = "; ".join(d.url for d in info.downloads)
    return (
        f"put {names} (from {urls}) into {out}, or set FLIP_DATA_MIRROR (or data.mirror) to a directory "
        f"that holds {info.directory}/ with those files"
    )


def fetch(url: str, dest: Path, *, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest``, resuming from ``dest.part``; returns ``dest``."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "flip-ctr", **({"Range": f"bytes={done}-"} if done else {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (fixed https/http URLs)
        if done and response.status != 206:  # server ignored the range: start again
            done = 0
        total = int(response.headers.get("Content-Length", 0)) + done
        with open(part, "ab" if done else "wb") as fh, tqdm(
            total=total or None, initial=done, unit="B", unit_scale=True, desc=dest.name, disable=not progress
        ) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                fh.write(chunk)
                bar.update(len(chunk))
    os.replace(part, dest)
    return dest


def _verify(path: Path, dl: Download, recorded: dict[str, str]) -> str:
    sha = file_digest(path)
    if dl.checksum:
        algo, expected = dl.checksum.split(":", 1)
        got = sha if algo == "sha256" else file_digest(path, algo)
        if got != expected:
            path.unlink()
            raise DataError(f"checksum mismatch: {algo} {got} != published {expected}", file=str(path),
                            fix="the download was corrupted or the file changed upstream: run `flip download` again")
    elif dl.filename in recorded and recorded[dl.filename] != sha:
        raise DataError(f"checksum differs from the one recorded at the first download ({recorded[dl.filename]})",
                        file=str(path), fix="delete the file and manifest.json to accept a new upstream version")
    return sha


def download(cfg: Config, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Make ``out`` hold the raw files of ``cfg.data.dataset``; returns the manifest."""
    source = get_source(cfg.data.dataset)
    info: SourceInfo = source.info(cfg)
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _download(cfg, source, info, out, progress)
    except BaseException:
        if created:  # a failed first download leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _download(cfg: Config, source: Any, info: SourceInfo, out: Path, progress: bool) -> dict[str, Any]:
    manifest_path = out / "manifest.json"
    old = read_json(manifest_path) if manifest_path.exists() else {}
    manifest: dict[str, Any] = {"dataset": info.name, "files": {}, "archives": {}, "origin": ""}

    if hasattr(source, "manifest"):  # generated or user-provided data: nothing to fetch
        manifest.update(source.manifest(cfg))
        write_json(manifest_path, manifest)
        return manifest

    mirror = cfg.data.resolved_mirror()
    if mirror:
        root = Path(mirror) / info.directory
        sources = [find_raw(root, raw.name) for raw in info.files]
        for raw, src in zip(info.files, sources):  # check them all before placing any: no partial output
            if not src.exists():
                raise DataError(
                    f"the data mirror lacks {raw.name}", file=str(src),
                    fix=f"copy the official {raw.name} of {info.name} to {src} (or unset FLIP_DATA_MIRROR to download)",
                )
        for src in sources:
            _place(src, out / src.name)
        manifest["origin"] = f"mirror:{root}"
    else:
        missing = [f for f in info.files if not find_raw(out, f.name).exists()]
        if missing:
            for dl in info.downloads:
                archive = out / dl.filename
                if not archive.exists():
                    try:
                        fetch(dl.url, archive, progress=progress)
                    except (urllib.error.URLError, OSError, TimeoutError) as exc:
                        raise TransientError(f"cannot download {dl.url} ({exc})", file=str(archive),
                                        fix=_where_to_put(info, out)) from None
                manifest["archives"][dl.filename] = {
                    "url": dl.url, "sha256": _verify(archive, dl, old.get("archives_sha256", {}))}
                _unpack(archive, out, [f.name for f in info.files if f.archive == dl.filename])
        manifest["origin"] = "download"
    for raw in info.files:
        path = find_raw(out, raw.name)
        if not path.exists():
            raise DataError("expected raw file is missing after download", file=str(path), fix=_where_to_put(info, out))
        manifest["files"][path.name] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    manifest["archives_sha256"] = {k: v["sha256"] for k, v in manifest["archives"].items()} or old.get(
        "archives_sha256", {})
    # no wall-clock time here: DVC hashes this file, and the same raw files must give the same hash
    # (a retrain without new data then re-runs nothing downstream)
    write_json(manifest_path, manifest)
    return manifest


def _unpack(archive: Path, out: Path, names: list[str]) -> None:
    """Extract ``names`` (matched by file name, whatever folder they sit in) from a zip, or gunzip."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            members = {Path(m).name: m for m in zf.namelist()}
            for name in names:
                if name not in members:
                    raise DataError(f"archive does not contain {name}", file=str(archive),
                                    fix="delete the archive and download it again")
                with zf.open(members[name]) as src, atomic_file(out / name) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    # gzip / json.gz files are read as they are by DuckDB: nothing to unpack
