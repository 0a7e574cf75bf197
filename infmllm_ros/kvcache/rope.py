"""Rotary position embedding (RoPE) with slot-index positions and key re-rotation.

Layout: the "rotate half" (GPT-NeoX / Hugging Face) convention, where dimension ``i`` is
paired with ``i + head_dim/2``. GGUF files store LLaMA Q/K weights permuted for the
interleaved convention; the GGUF loader undoes that permutation, so every model in this
package uses this layout.

Formula (Su et al., RoFormer, eq. 34): for position ``p`` and pair frequency
``inv_freq[i] = theta ** (-2i / rotary_dim)``, ``x' = x * cos(p * f) + rotate_half(x) * sin(p * f)``.
Rotations compose additively, so a key stored post-RoPE at slot ``s`` moves to slot ``s'``
by one more rotation of angle ``(s' - s) * f`` (StreamingLLM, Xiao et al. 2023, §3.2:
positions are assigned within the cache).

M-RoPE (Qwen2-VL, Wang et al. 2024, §2.1): a token has three positions (t, h, w); frequency
pair ``i`` takes its angle from the axis whose section of ``mrope_section`` holds ``i``
(transformers' ``Qwen2_5_VLRotaryEmbedding.recomposition_frequencies``). Interleaved M-RoPE
(Qwen3-VL, transformers' ``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``): pair ``i``
takes h when ``i % 3 == 1`` and ``i < 3 * sections[1]``, w when ``i % 3 == 2`` and
``i < 3 * sections[2]``, t otherwise. Text tokens have
``t = h = w``, which is plain RoPE. A compaction shift ``d`` moves all three axes by ``d``, which
rotates every pair by ``d * inv_freq[i]``: the same 1-D re-rotation, so :meth:`Rope.rerotate`
and the CUDA compaction kernel serve M-RoPE models unchanged.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Return ``[-x2, x1]`` for ``x = [x1, x2]`` split on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """RoPE angles for a head dimension and base ``theta``.

    Args:
        head_dim: per-head dimension D (even); the whole head is rotated.
        theta: RoPE base (e.g. 1e5 for SmolLM2, 1e6 for Qwen2).
        mrope_section: M-RoPE frequency pairs per axis (t, h, w), summing to ``head_dim / 2``
            (Qwen2.5-VL-3B: ``(16, 24, 24)``); None for 1-D RoPE.
        interleaved: the axes' pairs interleave (Qwen3-VL) instead of following in sections.

    Raises:
        ValueError: if ``head_dim`` is odd, ``theta`` is not positive or ``mrope_section`` does not
            have three parts summing to ``head_dim / 2``.
    """

    def __init__(
        self, head_dim: int, theta: float, mrope_section: tuple[int, ...] | None = None, interleaved: bool = False
    ):
        if head_dim % 2:
            raise ValueError(f"RoPE head_dim must be even, got {head_dim}")
        if theta <= 0:
            raise ValueError(f"RoPE theta must be positive, got {theta}")
        if mrope_section is not None and (
            len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2 or min(mrope_section) < 0
        ):
            raise ValueError(
                f"mrope_section {mrope_section} must be three sizes summing to head_dim/2 = {head_dim // 2}"
            )
        self.mrope_section = tuple(mrope_section) if mrope_section is not None else None
        #: per frequency pair, the axis (0 t, 1 h, 2 w) its M-RoPE angle comes from
        self.mrope_axis = None
        # the tables are made on the CPU whatever the default device, so that a decoder built on
        # the meta device (weights assigned after) keeps real ones
        cpu = torch.device("cpu")
        if self.mrope_section is not None:
            pair = torch.arange(head_dim // 2, device=cpu)
            if interleaved:
                sec = self.mrope_section
                self.mrope_axis = torch.where(
                    (pair % 3 == 1) & (pair < 3 * sec[1]), 1, torch.where((pair % 3 == 2) & (pair < 3 * sec[2]), 2, 0)
                )
            else:
                self.mrope_axis = torch.repeat_interleave(
                    torch.arange(3, device=cpu), torch.tensor(self.mrope_section, device=cpu)
                )
        self.head_dim = head_dim
        self.theta = float(theta)
        # fp32 inverse frequencies, computed as transformers' LlamaRotaryEmbedding does.
        self.inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=cpu).float() / head_dim)
        )
        self._inv_freq_by_device: dict[str, torch.Tensor] = {}

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The fp32 ``inv_freq`` table ``[head_dim / 2]`` on ``device`` (copied there once)."""
        key = str(device)
        if key not in self._inv_freq_by_device:
            self._inv_freq_by_device[key] = self.inv_freq.to(device)
        return self._inv_freq_by_device[key]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables for integer ``positions`` of any shape ``[...]``.

        Returns two tensors of shape ``[..., head_dim]`` and dtype ``dtype``.
        Angles are computed in fp32 (as transformers does) and then cast.
        """
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq_on(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def cos_sin_mrope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables ``[n, head_dim]`` for M-RoPE positions int64 ``[3, n]`` (t, h, w).

        Raises:
            ValueError: this RoPE has no ``mrope_section``, or ``positions`` is not ``[3, n]``.
        """
        if self.mrope_section is None:
            raise ValueError("3-D positions need an M-RoPE (mrope_section)")
        if positions.dim() != 2 or positions.shape[0] != 3:
            raise ValueError(f"M-RoPE positions must be [3, n], got {tuple(positions.shape)}")
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq_on(positions.device)  # [3, n, D/2]
        axis = self.mrope_axis.to(positions.device)
        freqs = freqs.gather(0, axis.expand(freqs.shape[1], -1)[None])[0]  # pair i from axis[i]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[heads, n, head_dim]`` by tables ``[n, head_dim]`` from :meth:`cos_sin`."""
        return x * cos + rotate_half(x) * sin

    def rerotate(self, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Move post-RoPE ``keys`` ``[..., n, head_dim]`` by ``shift`` positions ``[..., n]`` (int).

        ``shift`` is ``new_position - old_position``: ``new_slot - old_slot`` after compaction
        (zero or negative), or the M-RoPE lag correction (:class:`~.cache.KVCache`, any sign).
        The rotation is done in fp32 and cast back to the keys' dtype.
        """
        # Shifts take few distinct values (0 down to minus the tokens evicted), so look the
        # angles up in a table of that range rather than evaluating cos/sin for every key: the
        # table holds the same cos_sin values, so the result is bit-identical.
        low = int(shift.min()) if shift.numel() else 0
        high = max(int(shift.max()), 0) if shift.numel() else 0
        cos, sin = self.cos_sin(torch.arange(low, high + 1, device=shift.device), torch.float32)
        index = (shift - low).reshape(-1)
        cos = cos.index_select(0, index).view(*shift.shape, self.head_dim)
        sin = sin.index_select(0, index).view(*shift.shape, self.head_dim)
        return self.apply(keys.to(torch.float32), cos, sin).to(keys.dtype)
