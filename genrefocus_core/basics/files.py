"""Files in and out: writes that never destroy the previous file, output paths checked before the
work, and reads whose size is checked before memory is allocated.

Every file the pack writes (images, depth arrays, the demo's contact sheet, prompt-cache entries,
ComfyUI previews) goes through `atomic_write`: the bytes go to a temporary file in the target's
folder, which replaces the target (`os.replace`, atomic on one file system) only once it is complete
and flushed. A failed or interrupted write (disk full, no permission, Ctrl-C) leaves the previous
file as it was and removes the temporary file.

`check_output_path` is called before any long computation, so that a missing folder, a folder given
as a file, an unknown extension, an unwritable place or an output that would overwrite an input is
reported at once, not after minutes of sampling.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

from .errors import InputError, OutputError

# 8-bit RGB formats the CLI writes (by extension); PIL must also be able to save them here.
IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                    ".tif": "TIFF", ".tiff": "TIFF"}
ARRAY_EXTENSIONS = {".npy": "NPY"}


def image_format(path) -> str:
    """PIL format name for an output image path, by extension (OutputError for an unknown one)."""
    ext = Path(path).suffix.lower()
    formats = saveable_image_extensions()
    if ext not in formats:
        raise OutputError(f"Output image {path}: unknown extension '{ext or '(none)'}'; use one of "
                          f"{', '.join(sorted(formats))}.")
    return formats[ext]


def saveable_image_extensions() -> dict:
    from PIL import Image

    Image.init()
    return {ext: fmt for ext, fmt in IMAGE_EXTENSIONS.items() if fmt in Image.SAVE}


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(path, what: str = "output", *, extensions=None, inputs=(), others=()) -> Path:
    """Check an output file path before the work that produces it; returns it as a Path.

    extensions: {'.ext': format} the file may have (None: any). inputs: paths read by the same run;
    the output may not be (or resolve to) any of them. others: other outputs of the run (all must
    differ). Raises OutputError naming the problem: no path, a folder, an unknown extension, a missing
    or unwritable folder, a read-only existing file, or an input/output clash.
    """
    if path is None or str(path).strip() == "":
        raise OutputError(f"{what}: no output path given.")
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"{what} {p} is a folder; give a file name inside it (e.g. {p / 'out.png'}).")
    for q in inputs:
        if q is not None and str(q) != "" and _same_file(p, Path(q).expanduser()):
            raise OutputError(f"{what} {p} is the input file {q}: refusing to overwrite an input; choose "
                              "another output name.")
    for q in others:
        if q is not None and str(q) != "" and _same_file(p, Path(q).expanduser()):
            raise OutputError(f"{what} {p} is also given for another output ({q}); give each output its own file.")
    if extensions is not None and p.suffix.lower() not in extensions:
        raise OutputError(f"{what} {p}: unknown extension '{p.suffix or '(none)'}'; use one of "
                          f"{', '.join(sorted(extensions))}.")
    folder = p.parent
    if not folder.exists():
        raise OutputError(f"{what} {p}: the folder {folder} does not exist; create it first.")
    if not folder.is_dir():
        raise OutputError(f"{what} {p}: {folder} is not a folder.")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{what} {p} exists and is read-only; it is left as it is.")
    _probe_writable(folder, f"{what} {p}")
    return p


def check_output_folder(path, what: str = "output folder") -> Path:
    """An output folder: created if missing (with its parents); a file of that name is an error."""
    if path is None or str(path).strip() == "":
        raise OutputError(f"{what}: no folder given.")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p} is an existing file, not a folder; give a folder name (the images are "
                          "written into it). The file is left as it is.")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{what} {p} cannot be created: {e.strerror or e}.") from None
    _probe_writable(p, f"{what} {p}")
    return p


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in `folder` (os.access says yes to root on read-only places)."""
    probe = _temp_name(folder / "probe")
    try:
        probe.touch(exist_ok=False)  # O_CREAT | O_EXCL, like the temporary files
    except OSError as e:
        raise OutputError(f"{what}: cannot write in the folder {folder} ({e.strerror or e}).") from None
    with contextlib.suppress(OSError):
        probe.unlink()


@contextlib.contextmanager
def atomic_write(path, what: str = "output file"):
    """Context manager: yields a binary file object; on a clean exit its content replaces `path`.

    Any exception inside the block or while writing leaves `path` untouched and removes the temporary
    file; OSErrors (disk full, permissions) become an OutputError naming the file and the reason.
    """
    target = Path(path).expanduser()
    tmp = _temp_name(target)
    existed = target.exists()
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if existed:
            with contextlib.suppress(OSError):
                shutil.copymode(target, tmp)
        os.replace(tmp, target)
    except OSError as e:
        _remove(tmp)
        kept = " The previous file is unchanged." if existed else ""
        raise OutputError(f"Could not write {what} {target}: {e.strerror or e}.{kept}") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()


def save_bytes(path, data: bytes, what: str = "output file") -> Path:
    with atomic_write(path, what) as f:
        f.write(data)
    return Path(path)


def save_array(array, path, what: str = "array file") -> Path:
    """numpy .npy file, written atomically."""
    import numpy as np

    with atomic_write(path, what) as f:
        np.save(f, np.asarray(array), allow_pickle=False)
    return Path(path)


def save_pil_image(im, path, what: str = "image", **options) -> Path:
    """A PIL image, format by extension, written atomically."""
    fmt = image_format(path)
    with atomic_write(path, what) as f:
        im.save(f, format=fmt, **options)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Reading: know the size before allocating

def available_memory_bytes() -> int | None:
    """Memory the process can still get (MemAvailable on Linux), or None when unknown."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ImportError, AttributeError, OSError):
        import psutil

        return int(psutil.virtual_memory().available)
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _gib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """InputError before allocating `nbytes` for `what` when the machine does not have that much free."""
    avail = available_memory_bytes()
    if avail is not None and nbytes > avail:
        raise InputError(f"{what} needs about {_gib(nbytes)} of memory, but only {_gib(avail)} is available: "
                         "too large for this machine (downscale it, or free memory).")


def numpy_file_header(f, path, size: int) -> tuple[tuple, object]:
    """(shape, dtype) of a .npy stream of `size` bytes positioned at its start, without reading the
    data; InputError for a stream that is not .npy, holds pickled objects, or is shorter than its
    header promises (so nothing is allocated for a header that lies)."""
    import numpy as np
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = npformat.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({e}).") from None
    if dtype.hasobject:
        raise InputError(f"{path}: holds Python objects (a pickle), which are never loaded; save plain numbers.")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    nbytes = count * dtype.itemsize
    have = size - f.tell()
    if nbytes > have:
        raise InputError(f"{path}: the header promises an array of shape {tuple(shape)} ({_gib(nbytes)} of "
                         f"{dtype}), but the file holds only {have} bytes of data: truncated or corrupt.")
    return tuple(shape), dtype


# Working copies a loaded array gets on its way to a float32 map (float32 copy, torch tensor, result).
ARRAY_WORKING_COPIES = 3


def read_npy(f, path, size: int):
    """The array of a .npy stream of `size` bytes (a file, or a member of an .npz), after checking
    that its header tells the truth (`numpy_file_header`) and that it and its float32 working copies
    fit in the free memory: a header promising terabytes is refused before anything is allocated."""
    import numpy as np
    from numpy.lib import format as npformat

    start = f.tell()
    shape, dtype = numpy_file_header(f, path, size)
    count = int(np.prod(shape, dtype=object)) if shape else 1
    check_fits_in_memory(count * (dtype.itemsize + 4 * ARRAY_WORKING_COPIES),
                         f"{path} (an array of shape {tuple(shape)} of {dtype})")
    f.seek(start)
    return npformat.read_array(f, allow_pickle=False)
