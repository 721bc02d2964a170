"""Information-bottleneck codec for BEV features: real entropy-coded bytes, rate levels, tiles.

An agent's shared features ``[1, C, h, w]`` go through a learned analysis
transform to a small latent (``latent_channels`` at half the resolution); the
latent is scaled by the rate level's per-channel gain, rounded to integers and
range coded (``constriction``) with a learned per-channel probability model
(a factorized density, as in Ballé et al.'s "variational image compression with
a scale hyperprior", without the hyperprior). The latent is cut into square
tiles that are coded separately, each with its index, a CRC-32 and a relevance
(how much the detector expects to find there), so a frame that arrives in part
still decodes, and under a tight budget the least relevant tiles are left out.

The decoder is trained on exactly what the bytes decode to: rounding uses a
straight-through estimator, and the rate in the loss is the entropy model's
bits for the same symbols (with uniform noise standing in for rounding).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

PROBABILITY_SCALE = 1 << 16
"""Probability tables are stored as integer counts out of this, so every machine codes alike."""


class CodecError(ValueError):
    """Bytes or tiles that cannot be decoded (the message names the tile and what is wrong)."""


class CodecConfig(BaseModel):
    """Everything that shapes a codec's weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latent_channels: int = Field(16, ge=1)
    """Channels of the coded latent."""
    hidden_channels: int = Field(64, ge=1)
    latent_stride: int = Field(2, ge=1)
    """Latent cells per feature cell along each axis (the analysis transform's stride)."""
    tile_cells: int = Field(5, ge=1)
    """Edge of a square tile, in latent cells."""
    rate_levels: int = Field(5, ge=1)
    """Selectable rate levels, 0 (fewest bytes) to rate_levels - 1 (best features)."""
    alphabet_half: int = Field(24, ge=1)
    """Latent symbols are clamped to [-alphabet_half, alphabet_half]."""


@dataclass(frozen=True, slots=True)
class CodedTile:
    """One independently decodable piece of a coded frame."""

    index: int
    """Row-major index of the tile in the latent's tile grid."""
    payload: bytes
    crc32: int
    """``zlib.crc32`` of ``payload``."""
    relevance: float = 0.0
    """Task relevance in [0, 1] (the detector's peak confidence over the tile); higher goes first."""


@dataclass(frozen=True, slots=True)
class CodedFrame:
    """What a sender puts on the wire for one agent-frame (before framing)."""

    level: int
    feature_shape: tuple[int, int, int]
    """``(C, h, w)`` of the features that were coded."""
    tiles: tuple[CodedTile, ...]

    @property
    def payload_bytes(self) -> int:
        return sum(len(t.payload) for t in self.tiles)


@dataclass(slots=True)
class DecodeReport:
    """Which tiles decoded, and which were refused (index, reason); nothing else is lost."""

    decoded: list[int] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)


class FactorizedDensity(nn.Module):
    """A learned univariate density per channel, as a monotone CDF network (Ballé et al., 2018).

    ``cdf(x) = sigmoid(f(x))`` with ``f`` a small per-channel network whose
    matrices are kept positive (softplus), so ``f`` is increasing in ``x``.
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 8.0) -> None:
        super().__init__()
        widths = (1, *filters, 1)
        scale = init_scale ** (1 / (len(widths) - 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for k in range(len(widths) - 1):
            init = math.log(math.expm1(1 / scale / widths[k + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, widths[k + 1], widths[k]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, widths[k + 1], 1) - 0.5))
            if k < len(widths) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, widths[k + 1], 1)))

    def logits_cdf(self, x: torch.Tensor) -> torch.Tensor:
        """``x [C, N]`` -> ``f(x) [C, N]`` (the CDF is its sigmoid)."""
        logits = x[:, None, :]
        for k, (matrix, bias) in enumerate(zip(self.matrices, self.biases)):
            logits = torch.matmul(F.softplus(matrix.to(x.dtype)), logits) + bias.to(x.dtype)
            if k < len(self.factors):
                logits = logits + torch.tanh(self.factors[k].to(x.dtype)) * torch.tanh(logits)
        return logits[:, 0, :]

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """``P(y - 1/2 < Y < y + 1/2)`` for ``y [B, C, H, W]`` (same shape)."""
        b, c, h, w = y.shape
        flat = y.permute(1, 0, 2, 3).reshape(c, -1)
        lower, upper = self.logits_cdf(flat - 0.5), self.logits_cdf(flat + 0.5)
        sign = -torch.sign(lower + upper).detach()  # work in the tail where sigmoids are accurate
        p = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        return p.clamp_min(1e-9).reshape(c, b, h, w).permute(1, 0, 2, 3)

    @torch.no_grad()
    def pmf_table(self, half: int) -> torch.Tensor:
        """``[C, 2 * half + 1]`` probabilities of the integers -half..half; tails go to the ends."""
        channels = self.matrices[0].shape[0]
        edges = torch.arange(-half - 0.5, half + 1.0, 1.0, dtype=torch.float64,
                             device=self.matrices[0].device)  # 2 * half + 2 edges
        cdf = torch.sigmoid(self.logits_cdf(edges.expand(channels, -1)))
        cdf[:, 0], cdf[:, -1] = 0.0, 1.0
        return (cdf[:, 1:] - cdf[:, :-1]).clamp_min(0.0)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class FeatureCodec(nn.Module):
    """Learned transform + entropy model + range coder for one detector's features.

    Args:
        config: the codec's shape.
        feature_channels: ``C`` of the features it codes (read from the detector's backbone).
    """

    def __init__(self, config: CodecConfig, feature_channels: int) -> None:
        super().__init__()
        self.config = config
        self.feature_channels = feature_channels
        hidden, latent, stride = config.hidden_channels, config.latent_channels, config.latent_stride
        self.analysis = nn.Sequential(
            nn.Conv2d(feature_channels, hidden, kernel_size=stride + 1, stride=stride, padding=stride // 2),
            nn.ReLU(inplace=True), nn.Conv2d(hidden, latent, kernel_size=1))
        self.synthesis = nn.Sequential(
            nn.Conv2d(latent, hidden, kernel_size=1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(hidden, hidden, kernel_size=stride, stride=stride), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, feature_channels, kernel_size=1), nn.ReLU())
        # Level l scales the latent by exp(log_gain[l]) before rounding: a finer step, more bytes.
        self.log_gain = nn.Parameter(torch.linspace(math.log(0.5), math.log(4.0), config.rate_levels)[:, None]
                                     .repeat(1, latent))
        self.densities = nn.ModuleList(FactorizedDensity(latent) for _ in range(config.rate_levels))
        tables = torch.ones(config.rate_levels, latent, 2 * config.alphabet_half + 1, dtype=torch.int32)
        self.register_buffer("tables", tables)
        self._models: dict[int, np.ndarray] = {}
        self._codec_id: str | None = None

    @property
    def codec_id(self) -> str:
        """``ib-<hash>``: names these exact weights and tables; a receiver refuses any other id."""
        if self._codec_id is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._codec_id = f"ib-{digest.hexdigest()[:12]}"
        return self._codec_id

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._models.clear()
        self._codec_id = None
        return result

    def tile_count(self, feature_shape: tuple[int, int, int]) -> int:
        """Tiles in a coded frame of features ``(C, h, w)``."""
        rows, cols = self.tile_grid(self.latent_shape(feature_shape))
        return rows * cols

    # -- training path -------------------------------------------------------------------------

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.config.rate_levels:
            raise ValueError(f"rate level {level} out of range 0..{self.config.rate_levels - 1}")

    def latent(self, features: torch.Tensor, level: int) -> torch.Tensor:
        """Unrounded, gain-scaled, clamped latent ``[B, L, h/s, w/s]``."""
        self._check_level(level)
        half = self.config.alphabet_half
        return (self.analysis(features) * self.log_gain[level].exp()[None, :, None, None]).clamp(-half, half)

    def synthesise(self, symbols: torch.Tensor, level: int) -> torch.Tensor:
        """Integer latent (as float) -> features."""
        return self.synthesis(symbols / self.log_gain[level].exp()[None, :, None, None])

    def forward(self, features: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> (what the decoder will make of the bytes, estimated bits per sample ``[B]``)."""
        y = self.latent(features, level)
        noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5) if self.training else torch.round(y)
        bits = -torch.log2(self.densities[level].likelihood(noisy)).sum(dim=(1, 2, 3))
        decoded = self.synthesise(_RoundSTE.apply(y), level)
        return decoded, bits

    # -- the bytes -----------------------------------------------------------------------------

    @torch.no_grad()
    def update_tables(self) -> None:
        """Freeze the entropy model into integer tables (call after training, before saving)."""
        for level, density in enumerate(self.densities):
            pmf = density.pmf_table(self.config.alphabet_half)
            counts = torch.round(pmf / pmf.sum(dim=1, keepdim=True) * PROBABILITY_SCALE).clamp_min(1)
            self.tables[level] = counts.to(torch.int32).to(self.tables.device)
        self._models.clear()
        self._codec_id = None

    def _table(self, level: int) -> np.ndarray:
        if level not in self._models:
            self._models[level] = self.tables[level].cpu().numpy().astype(np.float64)
        return self._models[level]

    def tile_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Tiles per column and per row for a latent of ``(h, w)`` cells."""
        t = self.config.tile_cells
        return math.ceil(latent_hw[0] / t), math.ceil(latent_hw[1] / t)

    def latent_shape(self, feature_shape: tuple[int, int, int]) -> tuple[int, int]:
        s = self.config.latent_stride
        return math.ceil(feature_shape[1] / s), math.ceil(feature_shape[2] / s)

    def _tile_slices(self, index: int, latent_hw: tuple[int, int]) -> tuple[slice, slice]:
        _, cols = self.tile_grid(latent_hw)
        r, c = divmod(index, cols)
        t = self.config.tile_cells
        return slice(r * t, min((r + 1) * t, latent_hw[0])), slice(c * t, min((c + 1) * t, latent_hw[1]))

    @torch.no_grad()
    def encode(self, features: torch.Tensor, level: int, relevance: torch.Tensor | None = None) -> CodedFrame:
        """One agent's features ``[1, C, h, w]`` -> tiles of range-coded bytes.

        Args:
            relevance: optional ``[h, w]`` map in [0, 1] at feature resolution (e.g. the detector's
                heat-map peak); each tile gets the maximum over the cells it covers.
        """
        if features.dim() != 4 or features.shape[0] != 1 or features.shape[1] != self.feature_channels:
            raise ValueError(f"expected features [1, {self.feature_channels}, h, w], got {list(features.shape)}")
        half = self.config.alphabet_half
        symbols = (torch.round(self.latent(features, level))[0] + half).to(torch.int32).cpu().numpy()  # [L, h', w']
        latent_hw = symbols.shape[1:]
        if relevance is not None:
            s = self.config.latent_stride
            pooled = F.max_pool2d(relevance[None, None].float(), kernel_size=s, stride=s, ceil_mode=True)[0, 0]
            pooled = pooled.cpu().numpy()
        table = self._table(level)
        family = constriction.stream.model.Categorical(perfect=False)
        tiles = []
        rows, cols = self.tile_grid(latent_hw)
        for index in range(rows * cols):
            rs, cs = self._tile_slices(index, latent_hw)
            block = symbols[:, rs, cs]  # [L, th, tw]
            encoder = constriction.stream.queue.RangeEncoder()
            probabilities = np.repeat(table, block.shape[1] * block.shape[2], axis=0)
            encoder.encode(np.ascontiguousarray(block.reshape(-1)), family, probabilities)
            payload = encoder.get_compressed().tobytes()
            score = float(pooled[rs, cs].max()) if relevance is not None else 0.0
            tiles.append(CodedTile(index, payload, zlib.crc32(payload), score))
        return CodedFrame(level, tuple(int(v) for v in features.shape[1:]), tuple(tiles))

    @torch.no_grad()
    def estimate_bytes(self, features: torch.Tensor) -> list[int]:
        """Payload bytes the entropy model expects at each level for ``[1, C, h, w]`` (no coding done)."""
        analysed = self.analysis(features)[0]  # [L, h', w']
        half, estimates = self.config.alphabet_half, []
        for level in range(self.config.rate_levels):
            scaled = (analysed * self.log_gain[level].exp()[:, None, None]).clamp(-half, half)
            symbols = (torch.round(scaled) + half).long().flatten(1)  # [L, n]
            table = self.tables[level].to(torch.float64)
            bits = -torch.log2(torch.gather(table, 1, symbols) / table.sum(dim=1, keepdim=True)).sum()
            estimates.append(int(math.ceil(float(bits) / 8)))
        return estimates

    def encode_within(self, features: torch.Tensor, max_bytes: int, relevance: torch.Tensor | None = None
                      ) -> CodedFrame:
        """The highest level expected to fit ``max_bytes`` of payload, cut to fit by relevance if it does not."""
        estimates = self.estimate_bytes(features)
        level = max([lv for lv, b in enumerate(estimates) if b <= max_bytes], default=0)
        return select_tiles(self.encode(features, level, relevance), max_bytes)

    @torch.no_grad()
    def decode(self, frame: CodedFrame, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, DecodeReport]:
        """Tiles -> (features ``[1, C, h, w]``, received mask ``[1, 1, h, w]``, report).

        Missing or refused tiles leave their area at zero in the latent and zero in the
        mask, so fusion can treat it as not covered. A tile with a bad CRC, an index out of
        range, a duplicate index or undecodable bytes is refused (named in the report).
        """
        self._check_level(frame.level)
        channels, h, w = frame.feature_shape
        if channels != self.feature_channels:
            raise CodecError(f"frame has {channels} feature channels, this codec codes {self.feature_channels}")
        latent_hw = self.latent_shape(frame.feature_shape)
        rows, cols = self.tile_grid(latent_hw)
        half, latent = self.config.alphabet_half, self.config.latent_channels
        symbols = np.zeros((latent, *latent_hw), np.float32)
        received = np.zeros(latent_hw, np.float32)
        table = self._table(frame.level)
        family = constriction.stream.model.Categorical(perfect=False)
        report = DecodeReport()
        for tile in frame.tiles:
            reason = self._tile_problem(tile, rows * cols)
            if reason is None and self._duplicate(tile, received, latent_hw):
                reason = f"tile {tile.index}: sent twice in one frame"
            if reason is None:
                rs, cs = self._tile_slices(tile.index, latent_hw)
                count = latent * (rs.stop - rs.start) * (cs.stop - cs.start)
                try:
                    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(tile.payload, np.uint32))
                    values = decoder.decode(family, np.repeat(table, count // latent, axis=0))
                except Exception as err:  # noqa: BLE001 - the coder reports corrupt bytes in several ways
                    reason = f"undecodable payload ({err})"
                else:
                    symbols[:, rs, cs] = values.reshape(latent, rs.stop - rs.start, cs.stop - cs.start) - half
                    received[rs, cs] = 1.0
                    report.decoded.append(tile.index)
            if reason is not None:
                report.refused.append((tile.index, reason))
        latent_t = torch.from_numpy(symbols)[None].to(device)
        features = self.synthesise(latent_t, frame.level)[:, :, :h, :w]
        s = self.config.latent_stride
        mask = torch.from_numpy(received).to(device).repeat_interleave(s, 0).repeat_interleave(s, 1)[:h, :w]
        return features, mask[None, None], report

    @staticmethod
    def _tile_problem(tile: CodedTile, count: int) -> str | None:
        if not 0 <= tile.index < count:
            return f"tile index {tile.index} outside 0..{count - 1}"
        if zlib.crc32(tile.payload) != tile.crc32:
            return f"tile {tile.index}: CRC-32 mismatch"
        if len(tile.payload) % 4:
            return f"tile {tile.index}: payload of {len(tile.payload)} bytes is not whole 32-bit words"
        return None

    def _duplicate(self, tile: CodedTile, received: np.ndarray, latent_hw: tuple[int, int]) -> bool:
        rs, cs = self._tile_slices(tile.index, latent_hw)
        return bool(received[rs, cs].any())


def select_tiles(frame: CodedFrame, max_bytes: int | None) -> CodedFrame:
    """Keep the most relevant tiles whose payloads fit ``max_bytes`` (all when ``None``)."""
    if max_bytes is None:
        return frame
    kept, used = [], 0
    for tile in sorted(frame.tiles, key=lambda t: (-t.relevance, t.index)):
        if used + len(tile.payload) <= max_bytes:
            kept.append(tile)
            used += len(tile.payload)
    return CodedFrame(frame.level, frame.feature_shape, tuple(sorted(kept, key=lambda t: t.index)))


@dataclass(slots=True)
class ReceiveStats:
    """Counters of a receiver: what decoded and what was refused, by reason."""

    frames_decoded: int = 0
    frames_refused: int = 0
    tiles_decoded: int = 0
    tiles_refused: int = 0
    last_error: str = ""


def receive(codec: FeatureCodec, codec_id: str, level: int, feature_shape: tuple[int, int, int],
            tiles: tuple[CodedTile, ...], stats: ReceiveStats, device: torch.device | str = "cpu"
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decode one received frame, or refuse it (foreign codec, bad level or shape) and count why.

    Refused tiles (bad CRC, truncated, out of range, repeated) are counted and left out;
    the rest of the frame still decodes. Returns (features, received mask) or ``None``.
    """
    problem = None
    if codec_id != codec.codec_id:
        problem = f"codec {codec_id!r} is not this receiver's {codec.codec_id!r}"
    elif not 0 <= level < codec.config.rate_levels:
        problem = f"rate level {level} outside 0..{codec.config.rate_levels - 1}"
    elif len(feature_shape) != 3 or feature_shape[0] != codec.feature_channels or min(feature_shape) < 1:
        problem = f"feature shape {tuple(feature_shape)} does not fit {codec.feature_channels} channels"
    if problem is not None:
        stats.frames_refused += 1
        stats.last_error = problem
        return None
    features, mask, report = codec.decode(CodedFrame(level, tuple(feature_shape), tiles), device=device)
    stats.frames_decoded += 1
    stats.tiles_decoded += len(report.decoded)
    stats.tiles_refused += len(report.refused)
    if report.refused:
        stats.last_error = report.refused[-1][1]
    return features, mask
