"""Download and extract NIH ChestX-ray14: resumable, parallel, verified, safe.

    python -m chexnet_hvd.download --out data/nih                 # the 12 image tarballs
    python -m chexnet_hvd.download --out data/nih --extract       # ... then extract to data/nih/images
    python -m chexnet_hvd.download --out data/nih --extract-only  # extract what is there

A file is downloaded to NAME.part (resumed with an HTTP Range request after an interruption;
dropped connections and HTTP 5xx are retried with exponential backoff, a bounded number of times;
a .part that does not continue the server's file, e.g. a stale longer one, is started over),
verified (the whole gzip/tar stream is read; md5 when --md5 gives a checksum file), and only then
renamed to NAME, so a file under its final name is complete. Extraction refuses entries with
absolute paths, `..` or links (Python's tarfile `data` filter), puts every image in one images/
folder and marks each archive done, so re-running it is cheap.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import http.client
import os
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from chexnet_hvd import cli

# NIH Clinical Center's published batch-download links (batch_download_zips.py in the
# ChestX-ray14 release, https://nihcc.app.box.com/v/ChestXray-NIHCC), as images_001..012.tar.gz.
NIH_IMAGE_URLS = [
    "https://nihcc.box.com/shared/static/vfk49d74nhbxq3nqjg0900w5nvkorp5c.gz",
    "https://nihcc.box.com/shared/static/i28rlmbvmfjbl8p2n3ril0pptcmcu9d1.gz",
    "https://nihcc.box.com/shared/static/f1t00wrtdk94satdfb9olcolqx20z2jp.gz",
    "https://nihcc.box.com/shared/static/0aowwzs5lhjrceb3qp67ahp0rd1l1etg.gz",
    "https://nihcc.box.com/shared/static/v5e3goj22zr6h8tzualxfsqlqaygfbsn.gz",
    "https://nihcc.box.com/shared/static/asi7ikud9jwnkrnkj99jnpfkjdes7l6l.gz",
    "https://nihcc.box.com/shared/static/jn1b4mw4n6lnh74ovmcjb8y48h8xj07n.gz",
    "https://nihcc.box.com/shared/static/tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j.gz",
    "https://nihcc.box.com/shared/static/upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj.gz",
    "https://nihcc.box.com/shared/static/l6nilvfa9cg3s28tqv1qc1olm3gnz54p.gz",
    "https://nihcc.box.com/shared/static/hhq8fkdgvcari67vfhs7ppg2w6ni4jze.gz",
    "https://nihcc.box.com/shared/static/ioqwiy20ihqwyr8pf4c24eazhh281pbu.gz",
]
NIH_ARCHIVES = [f"images_{i:03d}.tar.gz" for i in range(1, 13)]
# The metadata has no static NIH link; a mirror (--base-url) serves it under these names.
NIH_METADATA = ["Data_Entry_2017_v2020.csv", "BBox_List_2017.csv", "train_val_list.txt", "test_list.txt"]
CHUNK = 1 << 20


@dataclasses.dataclass
class DownloadConfig:
    out: str = cli.field(help="target directory (archives, metadata, images/)")
    base_url: str = cli.field(os.environ.get("CHEXNET_NIH_BASE_URL", ""),
                              help="mirror serving every file as BASE/NAME (env CHEXNET_NIH_BASE_URL); "
                              "default: NIH's own links, images only")
    file_list: str = cli.field("", help="text file of `NAME [URL]` lines replacing the default list")
    md5: str = cli.field("", help="md5sum-style checksum file (`HASH  NAME` lines) to verify against")
    jobs: int = cli.field(2, help="parallel downloads", minimum=1)
    retries: int = cli.field(3, help="retries per file after a transient failure (a dropped "
                             "connection, HTTP 5xx), each resuming where the last one stopped",
                             minimum=0)
    backoff: float = cli.field(1.0, help="seconds before the first retry, doubled for each next "
                               "one (at most 60)", minimum=0)
    timeout: float = cli.field(60.0, help="socket timeout in seconds", exclusive_minimum=0)
    extract: bool = cli.field(False, help="extract the archives to OUT/images after downloading")
    extract_only: bool = cli.field(False, help="skip downloading; extract what is in OUT")
    progress: bool = cli.field(True, help="show progress bars")


def file_list(cfg: DownloadConfig) -> list[tuple[str, str]]:
    """(name, url) pairs: a --file-list, a mirror's BASE/NAME for images + metadata, or NIH's links."""
    if cfg.file_list:
        path = Path(cfg.file_list)
        if not path.is_file():
            raise cli.InputError(path, "no such file")
        pairs = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) == 1 and not cfg.base_url:
                raise cli.InputError(path, f"{parts[0]}: no URL and no --base-url")
            pairs.append((parts[0], parts[1] if len(parts) > 1 else f"{cfg.base_url.rstrip('/')}/{parts[0]}"))
        return pairs
    if cfg.base_url:
        return [(n, f"{cfg.base_url.rstrip('/')}/{n}") for n in NIH_ARCHIVES + NIH_METADATA]
    return list(zip(NIH_ARCHIVES, NIH_IMAGE_URLS, strict=True))


def read_md5(path: str) -> dict[str, str]:
    if not Path(path).is_file():
        raise cli.InputError(path, "no such file")
    sums = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def verify(path: Path, name: str, md5: str | None) -> None:
    """Read the whole archive (gzip CRC + tar structure) and compare the md5 if one is known."""
    if md5:
        digest = hashlib.md5()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
        if digest.hexdigest() != md5:
            raise cli.InputError(name, f"md5 mismatch ({digest.hexdigest()} != {md5})")
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile():
                        tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise cli.InputError(name, f"corrupt archive ({err})") from None


TRANSIENT_HTTP = (500, 502, 503, 504)


class Restart(Exception):
    """The server's answer does not continue the .part: start the file over."""


def content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a Content-Range header: `bytes 10-99/100` or `bytes */100`."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    first = span.split("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def transfer(url: str, part: Path, timeout: float, bar: tqdm) -> None:
    """One request for the rest of `part` (or all of it). Returns when `part` holds the whole
    file; Restart when the server's answer does not continue it (a stale .part longer than the
    file, a range that starts elsewhere); ConnectionError when the body ends early."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing after `have`: whole only if the total says so
            if content_range(err.headers.get("Content-Range"))[1] == have:
                return
            raise Restart(f"the server's file is not {have} bytes long") from None
        raise
    with response:
        length = response.headers.get("Content-Length")
        resumed = have and response.status == 206  # 200: the server ignored Range
        if resumed and content_range(response.headers.get("Content-Range"))[0] != have:
            raise Restart("the server answered another range")
        with open(part, "ab" if resumed else "wb") as fh:
            while block := response.read(CHUNK):
                fh.write(block)
                bar.update(len(block))
    if length is not None and part.stat().st_size != (have if resumed else 0) + int(length):
        raise ConnectionError("transfer ended early")


def fetch(name: str, url: str, out: Path, md5: str | None, cfg: DownloadConfig, bar: tqdm) -> str:
    """Download one file with resume and bounded retries (exponential backoff) on transient
    failures; verify; rename into place. Returns what happened."""
    final, part = out / name, out / (name + ".part")
    if final.is_file():
        return "present"
    failures, restarts = 0, 0
    while True:
        try:
            transfer(url, part, cfg.timeout, bar)
            break
        except Restart:
            part.unlink(missing_ok=True)
            restarts += 1
            if restarts > 1:
                raise cli.InputError(name, f"the server's answers do not fit together ({url})") from None
            continue
        except urllib.error.HTTPError as err:
            if err.code not in TRANSIENT_HTTP:
                raise cli.InputError(name, f"HTTP {err.code} {err.reason} from {url}") from None
            why = f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            why = str(err)  # refused or reset connections, timeouts, bodies that end early
        failures += 1
        if failures > cfg.retries:
            raise cli.InputError(name, f"download failed after {failures} tries ({why})")
        time.sleep(min(cfg.backoff * 2 ** (failures - 1), 60.0))
    try:
        verify(part, name, md5)
    except cli.InputError:
        part.replace(out / (name + ".bad"))  # keep it for inspection, never under the final name
        raise
    os.replace(part, final)
    return "downloaded"


def download(cfg: DownloadConfig) -> dict[str, str]:
    out = cli.make_dir(cfg.out)
    sums = read_md5(cfg.md5) if cfg.md5 else {}
    pairs = file_list(cfg)
    bar = tqdm(unit="B", unit_scale=True, desc="download", disable=not cfg.progress or None)
    with futures.ThreadPoolExecutor(max(1, cfg.jobs)) as pool:
        jobs = {pool.submit(fetch, n, u, out, sums.get(n), cfg, bar): n for n, u in pairs}
        results = {jobs[f]: f.result() for f in futures.as_completed(jobs)}
    bar.close()
    return results


def flatten_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's `data` filter (no absolute paths, no `..`, no links out, no devices), then only
    regular files, each put directly in the target folder."""
    member = tarfile.data_filter(member, dest)
    if member.isdir():
        return None
    if not member.isfile():
        raise tarfile.FilterError(f"refusing non-file entry {member.name!r}")
    return member.replace(name=Path(member.name).name, deep=False)


def extract(out: str | Path, progress: bool = True) -> int:
    """Extract every OUT/*.tar.gz into OUT/images; an archive is done once its marker exists."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    archives = sorted(out.glob("*.tar.gz"))
    if not archives:
        raise cli.InputError(out, "no *.tar.gz archives to extract")
    done = 0
    for archive in tqdm(archives, desc="extract", unit="archive", disable=not progress or None):
        marker = out / f".{archive.name}.extracted"
        if marker.is_file():
            continue
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(images, filter=flatten_filter)
        except tarfile.FilterError as err:
            raise cli.InputError(archive, f"unsafe entry refused: {err}") from None
        except (tarfile.TarError, OSError, EOFError) as err:
            raise cli.InputError(archive, f"cannot extract ({err})") from None
        marker.touch()
        done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(DownloadConfig, "Download (and extract) the NIH ChestX-ray14 files.", argv,
                           prog="python -m chexnet_hvd.download")
    if not cfg.extract_only:
        results = download(cfg)
        new = sum(v == "downloaded" for v in results.values())
        print(f"{len(results)} files in {cfg.out} ({new} downloaded, {len(results) - new} already there)")
        if not cfg.base_url and not cfg.file_list:
            print("note: NIH publishes no static links for the metadata; fetch Data_Entry_2017_v2020.csv, "
                  "train_val_list.txt and test_list.txt from https://nihcc.app.box.com/v/ChestXray-NIHCC")
    if cfg.extract or cfg.extract_only:
        n = extract(cfg.out, cfg.progress)
        print(f"extracted {n} archives to {Path(cfg.out) / 'images'}")
    return 0


if __name__ == "__main__":
    cli.run(main)
