"""One file over HTTP, verified and resumable: the standard library, and tqdm for the bar.

`download_file(url, dest, size=, sha256=)` writes to `dest.part`, continues a `.part` left by an
earlier run with an HTTP Range request (If-Range on the first response's ETag, so a file that
changed on the server is fetched whole, never spliced), retries a cut-off transfer, checks size
and sha256, and only then renames the file to `dest`: a file under its real name is always whole.
Errors raise DownloadError with a message that says what to do (and `.status`, the HTTP code).
mrgr1/weights.py decides what to fetch (the manifest) and where it goes.
"""
import hashlib
import http.client
import os
import urllib.error
import urllib.request

from tqdm import tqdm

CHUNK = 1 << 20  # 1 MiB per read: small enough for a smooth bar, large enough to be fast


class DownloadError(RuntimeError):
    """A transfer failed or gave a wrong file; the message says what to do."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status code, when the server answered with an error


def sha256_file(path):
    """The sha256 hex digest of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url, dest, *, size=None, sha256=None, timeout=60.0, retries=3, progress=True):
    """Fetch `url` to `dest` through `dest.part` (resumed if present); check size/sha256; rename.

    Returns the sha256 of the file. A wrong size or hash deletes the part file and raises;
    an interrupted transfer keeps it (up to `retries` automatic resumes, then a rerun resumes).
    An HTTP error raises DownloadError with `.status` set to the HTTP code.
    """
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, dest, size, timeout, progress)
            break
        except _Interrupted as why:
            if attempt == retries:
                raise DownloadError(f"download of {url} was cut off ({why}); {os.path.getsize(part)} bytes are "
                                    f"kept in {part}: run the same command again to resume.\n"
                                    + _by_hand(url, dest)) from None
    if os.path.exists(part + ".etag"):
        os.remove(part + ".etag")
    got_size, digest = os.path.getsize(part), sha256_file(part)
    problem = None
    if size is not None and got_size != size:
        problem = f"size {got_size} bytes, expected {size}"
    elif sha256 is not None and digest != sha256:
        problem = f"sha256 {digest}, expected {sha256}"
    if problem:
        os.remove(part)
        raise DownloadError(f"{dest}: downloaded file is wrong ({problem}); deleted {part}. Try again; if it "
                            "repeats, the source changed or a proxy altered it.\n" + _by_hand(url, dest))
    os.replace(part, dest)
    return digest


class _Interrupted(Exception):
    """The connection broke mid-file; the .part file is kept for a resume."""


def _fetch_into(url, dest, size, timeout, progress):
    """Append what the server sends to dest.part, asking only for the bytes not yet there."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and have >= size:
        return  # the part file already holds everything (the caller still checks it)
    request = urllib.request.Request(url, headers={"User-Agent": "mrgr1-weights"})
    if have:
        request.add_header("Range", f"bytes={have}-")
        if os.path.isfile(part + ".etag"):  # resume only the same version of the file; else get it whole
            with open(part + ".etag", encoding="utf-8") as f:
                request.add_header("If-Range", f.read())
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send after that offset: check what we have
            return
        raise DownloadError(f"HTTP {err.code} {err.reason} for {url}\n" + _by_hand(url, dest),
                            status=err.code) from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"cannot reach {url}: {getattr(err, 'reason', err)} (no network, a proxy or a "
                            "firewall? for a mirror set HF_ENDPOINT)\n" + _by_hand(url, dest)) from None
    with response:
        if have and response.status != 206:
            have = 0  # the file changed, or the server ignores Range: start again from byte 0
        etag = response.headers.get("ETag")
        if not have and etag and not etag.startswith("W/"):  # If-Range takes only strong validators
            with open(part + ".etag", "w", encoding="utf-8") as f:
                f.write(etag)
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, "ab" if have else "wb") as out, tqdm(
                total=have + expected if expected is not None else size, initial=have, unit="B",
                unit_scale=True, desc=os.path.basename(dest), disable=not progress) as bar:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    raise _Interrupted(str(err) or type(err).__name__) from None
                if not block:
                    break
                out.write(block)
                received += len(block)
                bar.update(len(block))
    if expected is not None and received < expected:
        raise _Interrupted(f"got {received} of {expected} bytes")


def _by_hand(url, dest):
    return (f"To download by hand: curl -L -C - -o {dest} {url}\n"
            f"then register the folder with: python -m mrgr1.weights add NAME --from FOLDER")
