"""ImageNet-C generated on the fly from a clean evaluation set with the ``imagecorruptions`` package
(Michaelis et al. 2019; the corruptions of Hendrycks & Dietterich, ICLR 2019), for ``ltsam eval``'s
``corrupt`` sets.

Each clean image is seen at the model's input size (the evaluation transform's resize and crop), corrupted by
``imagecorruptions.corrupt`` (uint8 H x W x 3), and then normalised (or, with ``--tte``, cut into TTE's crops,
as a stored ImageNet-C image would be). numpy's global RNG, which every corruption draws from, is seeded per
sample from (sample index, corruption, severity) and restored afterwards: two runs see the same images, and
the same image under a corruption does not depend on the batch size or the number of loader workers.

``imagecorruptions`` 1.1.2 (2019, its last release) calls three names its dependencies have renamed since:
``np.float_`` (numpy 2: ``np.float64``; fog), ``skimage.filters.gaussian(multichannel=True)`` (scikit-image
0.19+: ``channel_axis=-1``; glass_blur, gaussian_blur, elastic_transform) and ``skimage.util.random_noise``'s
draw from numpy's global RNG (scikit-image 0.21+: its own ``rng``, which a global seed does not reach;
impulse_noise). :func:`imagecorruptions_module` maps these three names, in the package's module namespace only
and only where the installed library needs it; the package's functions themselves run unchanged, so all 19
corruptions compute what they computed with the libraries of 2019 (impulse noise draws its salt and pepper
from a generator seeded by the global RNG: same distribution, different draws).

A corruption that still does not run, or does not repeat under the same seed (a future library change), is
refused before the evaluation starts, naming it and the reason: a mean over fewer corruptions is not the
ImageNet-C mean that papers report, so it is never produced silently; a user who accepts a partial mean
leaves the corruption out with ``--corruptions``, and the table's title says how many corruptions the mean
covers.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from ltsam.data.files import ImageListDataset

SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIZE = 32  # imagecorruptions refuses smaller images


class CorruptionError(ValueError):
    """A corruption set that cannot be generated, in one sentence."""


class _Renamed(types.ModuleType):
    """``module`` with a few attributes replaced; every other name is the module's own."""

    def __init__(self, module: types.ModuleType, **replaced: Any) -> None:
        super().__init__(module.__name__)
        self.__dict__.update(replaced, _module=module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _gaussian_with_multichannel(gaussian: Callable) -> Callable:
    @functools.wraps(gaussian)
    def adapted(image, *args, multichannel: bool = False, **kwargs):
        if multichannel:
            kwargs.setdefault("channel_axis", -1)
        return gaussian(image, *args, **kwargs)
    return adapted


def _random_noise_from_global_rng(random_noise: Callable) -> Callable:
    @functools.wraps(random_noise)
    def adapted(image, *args, **kwargs):
        kwargs.setdefault("rng", np.random.randint(2**32, dtype=np.uint64))
        return random_noise(image, *args, **kwargs)
    return adapted


@functools.cache
def imagecorruptions_module() -> types.ModuleType:
    """The ``imagecorruptions`` package with the three renamed names of its dependencies mapped (module doc)."""
    try:
        with warnings.catch_warnings():  # its own imports of pkg_resources and scipy.ndimage.interpolation
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            import imagecorruptions
            import imagecorruptions.corruptions as functions
    except ImportError as err:
        raise CorruptionError(f"generating corrupted sets needs the imagecorruptions package: pip install "
                              f"'ltsam[corruptions]' ({err})") from None
    def takes(function: Callable, name: str) -> bool:  # an adapter's own signature counts (no second wrap)
        return name in inspect.signature(function, follow_wrapped=False).parameters

    if not hasattr(functions.np, "float_"):
        functions.np = _Renamed(functions.np, float_=np.float64)
    if not takes(functions.gaussian, "multichannel"):
        functions.gaussian = _gaussian_with_multichannel(functions.gaussian)
    util = functions.sk.util
    if takes(util.random_noise, "rng"):
        functions.sk = _Renamed(functions.sk, util=_Renamed(util, random_noise=_random_noise_from_global_rng(
            util.random_noise)))
    return imagecorruptions


def corruption_seed(index: int, corruption: str, severity: int) -> int:
    """numpy's seed for sample ``index`` under ``corruption`` at ``severity`` (stable across processes)."""
    return zlib.crc32(f"{corruption}/{severity}/{index}".encode())


def seeded_corrupt(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``imagecorruptions.corrupt`` with numpy's global RNG seeded, and given back as it was."""
    corrupt = imagecorruptions_module().corrupt
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return corrupt(image, corruption_name=corruption, severity=severity)
    finally:
        np.random.set_state(state)


def select(corruptions: str, severities: str) -> tuple[list[str], list[int]]:
    """``--corruptions`` (names or the package's groups: common, validation, all, noise, blur, weather,
    digital; comma-separated) and ``--severities`` (comma-separated 1-5) as lists, checked."""
    package = imagecorruptions_module()
    groups = ("common", "validation", "all", "noise", "blur", "weather", "digital")
    valid = package.get_corruption_names("all")
    names: list[str] = []
    for item in filter(None, (part.strip() for part in corruptions.split(","))):
        if item not in valid and item not in groups:
            raise CorruptionError(f"--corruptions: unknown corruption '{item}'; valid: {', '.join(valid)} "
                                  f"(or a group: {', '.join(groups)})")
        names += [n for n in (package.get_corruption_names(item) if item in groups else [item]) if n not in names]
    levels = [part.strip() for part in severities.split(",") if part.strip()]
    bad = [s for s in levels if not (s.isdigit() and int(s) in SEVERITIES)]
    if bad or not levels or not names:
        raise CorruptionError(f"--corruptions '{corruptions}' --severities '{severities}': give at least one "
                              "corruption and severities among 1, 2, 3, 4, 5")
    return names, sorted({int(s) for s in levels})


def check_runs(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    """Each (corruption, severity) on a small random image, twice under one seed: it must run and repeat,
    else it is refused before any evaluation (module doc: no mean over fewer corruptions by accident)."""
    image = np.random.default_rng(0).integers(0, 256, (MIN_SIZE, MIN_SIZE, 3), dtype=np.uint8)
    for corruption in corruptions:
        for severity in severities:
            try:
                first, second = (seeded_corrupt(image, corruption, severity, 0) for _ in range(2))
            except Exception as err:
                raise CorruptionError(f"corruption '{corruption}' (severity {severity}) does not run with the "
                                      f"installed libraries ({type(err).__name__}: {err}); leave it out with "
                                      "--corruptions") from None
            if not np.array_equal(first, second):
                raise CorruptionError(f"corruption '{corruption}' gives different images under the same seed (it "
                                      "draws random numbers numpy's global seed does not reach), so its accuracy "
                                      "would not repeat; leave it out with --corruptions")


def split_at_tensor(transform: T.Compose) -> tuple[T.Compose, T.Compose]:
    """The evaluation transform's image steps (resize, crop) and its tensor steps (to tensor, normalise)."""
    steps = transform.transforms
    at = next((i for i, step in enumerate(steps) if isinstance(step, (T.ToTensor, T.PILToTensor))), None)
    if at is None:
        raise CorruptionError(f"the evaluation transform {transform} has no to-tensor step to corrupt before")
    return T.Compose(steps[:at]), T.Compose(steps[at:])


class CorruptedImages(Dataset):
    """``clean``'s images through ``crop`` (the model's input size), corrupted (seeded per sample), then
    ``finish`` (to tensor and normalise, or TTE's crops); labels as ``clean``'s."""

    def __init__(self, clean: ImageListDataset, corruption: str, severity: int, crop: Callable,
                 finish: Callable) -> None:
        self.clean, self.corruption, self.severity = clean, corruption, severity
        self.crop, self.finish = crop, finish

    def __len__(self) -> int:
        return len(self.clean)

    def corrupted(self, index: int) -> Image.Image:
        """Sample ``index`` corrupted at the model's input size (what an ImageNet-C folder would store)."""
        image, _ = self.clean[index]
        pixels = np.asarray(self.crop(image).convert("RGB"))
        try:
            pixels = seeded_corrupt(pixels, self.corruption, self.severity,
                                    corruption_seed(index, self.corruption, self.severity))
        except Exception as err:
            raise RuntimeError(f"corrupting image '{self.clean.samples[index][0]}' with {self.corruption} "
                               f"severity {self.severity} failed: {err}") from err
        return Image.fromarray(pixels)

    def __getitem__(self, index: int):
        return self.finish(self.corrupted(index)), self.clean.samples[index][1]
