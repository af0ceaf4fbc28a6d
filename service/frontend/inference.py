"""The one inference path under every protocol: check the inputs, prepare them with each domain's card,
submit them to the engine, and hand back logits with the cards of the versions that computed them.

REST (`service.frontend.rest`) and the Open Inference Protocol (`service.frontend.oip`) are codecs over `Inference`:
they parse their wire format into encoded files or pixel arrays, and encode what comes back.
A front end keeps the cards of the domains it serves (labels, preprocessing) so that a request
costs one call to the engine; the engine answers with the version that computed each image, and a
card of another version is fetched again (a registration elsewhere is followed on the next request).

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import time

import numpy as np
from PIL import Image

from model.preprocessing import ImageDecodeError, Preprocessing, gray_rgb, normalize, open_image, preprocess
from service import tracing
from service.client import Answer, EngineClient
from service.exceptions import StaleCard, UnknownDomainError
from service.frontend.errors import ApiError
from service.settings import Settings
from service.views import Card, Residency

CARDS_KEEP = 10_000  # domains whose cards a front end keeps at least (least recently used dropped)
INLINE_PIXELS = 256 * 256
INLINE_BYTES = 256 * 1024
"""An image of at most `INLINE_PIXELS` (shared among the domains it is prepared for) and `INLINE_BYTES`
is decoded on the event loop: handing it to a thread costs more CPU than decoding it (`python -m
bench.serve`, 48x48 PNGs: 608 -> 702 img/s). Larger ones, told apart by their size and header before
any pixel is decoded, go to the preprocess pool, so that no upload holds the event loop for long."""


def decode_and_preprocess(data: bytes, preps: list[Preprocessing], max_pixels: int) -> list[np.ndarray]:
    """One input per preprocessing; the image is decoded once per distinct `resize` (a JPEG at the reduced
    scale that size allows, exactly as training's evaluation decodes it)."""
    decoded: dict[int, Image.Image] = {}
    out = []
    for prep in preps:
        if prep.resize not in decoded:
            decoded[prep.resize] = open_image(data, max_pixels, min_side=prep.resize)
        out.append(preprocess(decoded[prep.resize], prep))
    return out


def pixels_to_inputs(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Already resized and cropped uint8 pixels [N, S, S, 3] -> the model's input for a domain."""
    if prep.grayscale:  # the same conversion as decoding an image for this domain
        pixels = gray_rgb(pixels)
    return normalize(pixels, prep)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (scores that sum to 1 whatever the logits' scale)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Classified:
    """Every (image, domain) pair's answer: `answers[i][j]` for image i and domain j, with `cards[j]`
    the card of the version that computed them."""

    cards: list[Card]
    answers: list[list[Answer]]
    prepare_s: float
    infer_s: float

    @property
    def total_ms(self) -> float:
        return (self.prepare_s + self.infer_s) * 1000


class Inference:
    def __init__(self, engine: EngineClient, settings: Settings, pool: concurrent.futures.Executor):
        self.engine, self.settings, self.pool = engine, settings, pool
        self._cards: collections.OrderedDict[str, Card] = collections.OrderedDict()
        self.cards_keep = CARDS_KEEP

    def follow_residency(self, residency: Residency | None) -> None:
        """Keep the cards of as many domains as the engine holds in memory (about 2 KB each): a front end
        that forgot a resident domain's card would ask for it again on that domain's next request."""
        if residency is not None:
            held = residency.fits + int(residency.host_cache_mb * 2**20) // max(1, residency.bytes_per_domain)
            self.cards_keep = max(CARDS_KEEP, held)

    # ----- cards ------------------------------------------------------------------------------

    async def cards(self, domains: list[str]) -> list[Card]:
        """The domains' cards as this front end knows them (asked of the engine, in parallel, the first
        time); no task is made when every card is known, as for almost every request."""
        known = [self._cards.get(d) for d in domains]
        missing = [i for i, card in enumerate(known) if card is None]
        for i, card in enumerate(known):
            if card is not None:
                self._cards.move_to_end(domains[i])
        if missing:
            fetched = await asyncio.gather(*(self.refresh(domains[i]) for i in missing))
            for i, card in zip(missing, fetched):
                known[i] = card
        return known

    async def refresh(self, domain: str) -> Card:
        """The domain's card as the engine serves it now (loading the domain if needed)."""
        try:
            card = await self.engine.card(domain)
        except UnknownDomainError:
            self._cards.pop(domain, None)
            raise
        self._cards[domain] = card
        self._cards.move_to_end(domain)
        while len(self._cards) > self.cards_keep:
            self._cards.popitem(last=False)
        return card

    # ----- inputs -----------------------------------------------------------------------------

    def check_count(self, count: int) -> None:
        """The most images one request may carry, whatever their form."""
        limit = self.settings.max_files
        if count > limit:
            raise ApiError(413, "too_many_files", f"At most {limit} images per request (RA_MAX_FILES); got {count}.")

    def check_files(self, files: list[bytes], names: list[str | None]) -> None:
        """The limits every protocol applies to encoded images, before any is decoded."""
        s = self.settings
        self.check_count(len(files))
        for i, (data, name) in enumerate(zip(files, names)):
            what = repr(name) if name else f"Image {i}"
            if len(data) > s.max_image_bytes:
                raise ApiError(
                    413,
                    "image_too_large",
                    f"{what} is larger than {s.max_image_bytes} bytes (RA_MAX_IMAGE_BYTES); send a smaller image.",
                )
            if not data:
                raise ApiError(400, "empty_file", f"{what} is empty.")

    async def _decode(self, files: list[bytes], preps: list[Preprocessing]) -> list[list[np.ndarray]]:
        """`decode_and_preprocess` of every image: small ones here, large ones in the pool, in parallel."""
        limit = self.settings.max_image_pixels
        inline_limit = min(limit, INLINE_PIXELS // len(preps))
        inputs: list[list[np.ndarray] | None] = []
        for data in files:
            if len(data) > INLINE_BYTES:
                inputs.append(None)
                continue
            try:
                inputs.append(decode_and_preprocess(data, preps, inline_limit))
            except ImageDecodeError as exc:  # a header over the inline limit: nothing was decoded yet
                if exc.code != "too_many_pixels" or inline_limit == limit:
                    raise
                inputs.append(None)
        large = [i for i, x in enumerate(inputs) if x is None]
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(
            *(loop.run_in_executor(self.pool, decode_and_preprocess, files[i], preps, limit) for i in large)
        )
        for i, x in zip(large, done):
            inputs[i] = x
        return inputs

    # ----- the path -----------------------------------------------------------------------------

    async def classify(
        self, domains: list[str], lane: str | None, files: list[bytes] | None = None, pixels: np.ndarray | None = None
    ) -> Classified:
        """Classify every image (encoded `files`, or uint8 `pixels` [N, S, S, 3]) with every domain, in one
        submission to the engine."""
        start = time.perf_counter()
        for attempt in range(3):
            cards = await self.cards(domains)
            preps = [c.preprocessing for c in cards]
            if files is not None:
                per_image = await self._decode(files, preps)
                count = len(per_image)
                images = (
                    np.stack([x for row in per_image for x in row]) if count else np.zeros((0, 1, 1, 3), np.float32)
                )
            else:  # image-major as for files: image i with domain j at i * len(domains) + j
                count = len(pixels)
                per_domain = [pixels_to_inputs(pixels, p) for p in preps]
                images = (
                    per_domain[0]
                    if len(per_domain) == 1
                    else np.stack(per_domain, axis=1).reshape(-1, *pixels.shape[1:])
                )
            prepared = time.perf_counter()
            if tracing.enabled:
                tracing.record("decode", None, start, prepared, {"ra.images": count}, clock=time.perf_counter)
            which = [j for _ in range(count) for j in range(len(domains))]
            try:
                with tracing.span(
                    "engine call", tracing.CLIENT, **{"ra.images": len(images), "ra.domains": len(domains)}
                ):
                    answers = await self.engine.infer(domains, preps, images, which, lane)
                break
            except StaleCard:
                if attempt == 2:
                    raise
                for domain in domains:
                    self._cards.pop(domain, None)
            except UnknownDomainError as exc:
                self._cards.pop(exc.domain, None)
                raise
        done = time.perf_counter()
        grid = [answers[i * len(domains) : (i + 1) * len(domains)] for i in range(count)]
        for j, domain in enumerate(domains):
            served = grid[0][j].version if grid else cards[j].version
            if served != cards[j].version:  # another version computed them: answer with its labels
                cards[j] = await self.refresh(domain)
        return Classified(cards, grid, prepared - start, done - prepared)
