"""The fixed front end of the feature models: a 2-D wavelet scattering transform (Mallat 2012; kymatio,
Andreux et al. 2020), as Tramer and Boneh ("Differentially private learning needs better features
(or much more data)", ICLR 2021) put before a private linear model or small CNN.

:class:`Scattering` maps ``(B, C, H, W)`` images to ``(B, C * K, H / 2^J, W / 2^J)`` coefficients
(``K = 1 + J L + L^2 J (J - 1) / 2``: 81 for ``J = 2``, ``L = 8``). It has **no parameters and no
state**: the Morlet filters depend on the image shape, ``J`` and ``L`` only (never on data), are
built on first use for each input shape and device and kept outside the module's ``state_dict``, so
no checkpoint carries them, no optimizer sees them and Opacus' ``GradSampleModule`` hooks nothing in
it. The transform is deterministic (FFTs), so a SISA replay recomputes it bit for bit.

kymatio 0.3.0's ``kymatio.torch`` imports its 3-D frontend, which imports ``scipy.special.sph_harm``
(gone from current scipy): the 2-D frontend is imported directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

J = 2  # scales: coefficients on a 2^J-subsampled grid (4x4 for 16-px images)
L = 8  # orientations


def coefficients(j: int = J, angles: int = L) -> int:
    """Scattering coefficients per input channel (orders 0, 1 and 2)."""
    return 1 + j * angles + angles * angles * j * (j - 1) // 2


class Scattering(nn.Module):
    """A fixed scattering transform (see the module docstring); ``(B, C, H, W) -> (B, C K, H', W')``."""

    def __init__(self, j: int = J, angles: int = L) -> None:
        super().__init__()
        self.j, self.angles = j, angles
        self._banks: dict[tuple[int, int, str], Any] = {}  # (H, W, device) -> kymatio transform: not state

    def _bank(self, h: int, w: int, device: torch.device) -> Any:
        key = (h, w, str(device))
        if key not in self._banks:
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

            with torch.random.fork_rng(devices=[]):  # building filters draws no random numbers; be sure
                self._banks[key] = ScatteringTorch2D(J=self.j, shape=(h, w), L=self.angles).to(device)
        return self._banks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        with torch.no_grad():  # nothing before it trains: no gradient to carry
            out = self._bank(h, w, x.device)(x.contiguous())
        return out.reshape(b, c * out.shape[2], out.shape[3], out.shape[4])

    def __getstate__(self) -> dict[str, Any]:  # pickling / deepcopy: the banks are rebuilt on use
        state = self.__dict__.copy()
        state["_banks"] = {}
        return state
