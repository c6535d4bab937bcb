"""download_dataset.sh / extract_images.sh against a real HTTP server on 127.0.0.1 serving small
generated tarballs: full run, interrupted + resumed transfer, corrupt archive, 404, unsafe entry."""

import hashlib
import io
import tarfile

from conftest import ROOT, assert_one_line_error, run
from PIL import Image


def make_archive(path, names, extra=None):
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            buf = io.BytesIO()
            Image.new("L", (8, 8), 7).save(buf, format="PNG")
            info = tarfile.TarInfo(f"images/{name}")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
        if extra:
            extra(tar)


def download(out, url, *args):
    return run([str(ROOT / "download_dataset.sh"), "--out", str(out), "--base-url", url,
                "--file-list", str(out.parent / "files.txt"), "--no-progress", *map(str, args)],
               timeout=120)


def test_full_run_with_resume_md5_and_idempotent_extract(server, tmp_path):
    root, url, httpd = server
    for i in (1, 2):
        make_archive(root / f"images_{i:03d}.tar.gz", [f"0000000{i}_00{j}.png" for j in range(50)])
    (root / "test_list.txt").write_text("00000001_000.png")
    (tmp_path / "files.txt").write_text("images_001.tar.gz\nimages_002.tar.gz\ntest_list.txt\n")
    md5 = tmp_path / "md5.txt"
    md5.write_text("".join(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}\n" for p in root.iterdir()))
    httpd.cut.add("images_002.tar.gz")  # the first transfer of this file dies half-way

    out = tmp_path / "nih"
    proc = download(out, url, "--md5", str(md5), "--extract")
    assert proc.returncode == 0, proc.stderr
    for p in root.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert ("images_002.tar.gz", None) in httpd.log
    assert any(name == "images_002.tar.gz" and rng and rng != "bytes=0-" for name, rng in httpd.log)
    assert len(list((out / "images").iterdir())) == 100 and not list(out.glob("*.part"))

    again = run([str(ROOT / "extract_images.sh"), str(out), "--no-progress"], check=True)
    assert "extracted 0 archives" in again.stdout  # idempotent: already-extracted archives skipped


def test_corrupt_archive_is_reported_and_never_named_complete(server, tmp_path):
    root, url, _ = server
    make_archive(root / "images_001.tar.gz", ["a.png"])
    data = bytearray((root / "images_001.tar.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "images_001.tar.gz").write_bytes(bytes(data))
    (tmp_path / "files.txt").write_text("images_001.tar.gz\n")
    proc = download(tmp_path / "nih", url)
    assert_one_line_error(proc, "images_001.tar.gz", "corrupt archive")
    assert not (tmp_path / "nih" / "images_001.tar.gz").exists()


def test_http_404_fails_cleanly(server, tmp_path):
    _, url, _ = server
    (tmp_path / "files.txt").write_text("images_009.tar.gz\n")
    assert_one_line_error(download(tmp_path / "nih", url), "images_009.tar.gz", "HTTP 404")


def test_extraction_refuses_parent_directory_entries(tmp_path):
    out = tmp_path / "nih"
    out.mkdir()

    def evil(tar):
        info = tarfile.TarInfo("../evil.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))

    make_archive(out / "images_001.tar.gz", ["ok.png"], extra=evil)
    proc = run([str(ROOT / "extract_images.sh"), str(out), "--no-progress"])
    assert_one_line_error(proc, "images_001.tar.gz", "unsafe entry refused")
    assert not (tmp_path / "evil.png").exists() and not (out / "evil.png").exists()
    assert not (out / ".images_001.tar.gz.extracted").exists()


def test_a_stale_longer_part_is_started_over(server, tmp_path):
    """HTTP 416 for a .part longer than the file is not "complete": Content-Range gives the
    real length, so the download starts over (it used to keep the stale bytes)."""
    root, url, httpd = server
    make_archive(root / "images_001.tar.gz", ["a.png", "b.png"])
    good = (root / "images_001.tar.gz").read_bytes()
    (tmp_path / "files.txt").write_text("images_001.tar.gz\n")
    out = tmp_path / "nih"
    out.mkdir()
    (out / "images_001.tar.gz.part").write_bytes(good + b"stale bytes of an older, longer file")
    assert download(out, url).returncode == 0
    assert (out / "images_001.tar.gz").read_bytes() == good
    assert [rng for _, rng in httpd.log] == [f"bytes={len(good) + 36}-", None]


def test_a_part_that_is_already_whole_is_kept(server, tmp_path):
    root, url, httpd = server
    make_archive(root / "images_001.tar.gz", ["a.png"])
    good = (root / "images_001.tar.gz").read_bytes()
    (tmp_path / "files.txt").write_text("images_001.tar.gz\n")
    out = tmp_path / "nih"
    out.mkdir()
    (out / "images_001.tar.gz.part").write_bytes(good)
    assert download(out, url).returncode == 0
    assert (out / "images_001.tar.gz").read_bytes() == good and len(httpd.log) == 1


def test_transient_server_errors_are_retried_with_backoff_then_given_up(server, tmp_path):
    root, url, httpd = server
    make_archive(root / "images_001.tar.gz", ["a.png"])
    (tmp_path / "files.txt").write_text("images_001.tar.gz\n")
    httpd.unavailable["images_001.tar.gz"] = 2
    proc = download(tmp_path / "ok", url, "--retries", 3, "--backoff", 0.05)
    assert proc.returncode == 0, proc.stderr
    assert len(httpd.log) == 3 and (tmp_path / "ok" / "images_001.tar.gz").is_file()
    httpd.unavailable["images_001.tar.gz"] = 5
    proc = download(tmp_path / "no", url, "--retries", 2, "--backoff", 0.05)
    assert_one_line_error(proc, "images_001.tar.gz", "download failed after 3 tries", "HTTP 503")
    assert not (tmp_path / "no" / "images_001.tar.gz").exists()


def test_extract_only_extracts_what_is_there_without_downloading(tmp_path):
    out = tmp_path / "nih"
    out.mkdir()
    make_archive(out / "images_001.tar.gz", ["00000001_000.png", "00000001_001.png"])
    proc = run(["python", "-m", "chexnet_hvd.download", "--out", str(out), "--extract-only",
                "--base-url", "http://127.0.0.1:9", "--no-progress"], timeout=120)  # nothing listens
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000001_000.png", "00000001_001.png"]
