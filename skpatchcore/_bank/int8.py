"""Int8 products that rank bank entries for the exact re-ranking.

The exact search first ranks the whole bank for each query, keeps a few
more candidates than asked for, and computes the distances to those in
float64 (:mod:`skpatchcore._bank.search`). On a CPU the ranking can use
8-bit integers: one scale for the bank and its queries, integer products
summed exactly in int32 (AVX-512 VNNI and AVX2 have instructions for them),
and the squared bank norms folded into the product as extra columns, so
that a tile of keys is the product and nothing else.

Quantisation moves a key by much less than the gap that the re-ranking
margin leaves: on real patch features the true nearest entry always stayed
among the candidates (docs/results.rst, "Prediction stages on the CPU",
"Earlier measurements"). The product is exact, hence the keys, and so the
candidates, do not depend on how queries are batched.

A query with a value beyond the bank's range would be clipped; such rows,
few on real features (same section), are ranked in float32 instead.
"""

import functools

import torch

_LEVELS = 127


@functools.cache
def int8_products_work():
    """Whether ``torch._int_mm`` runs on this CPU and sums exactly.

    Checked once per process on a product whose int32 result is known.
    A CPU without vector instructions for it would be slower than float32,
    so those are left out too.
    """
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return False
    int_mm = getattr(torch, "_int_mm", None)
    if int_mm is None:
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (33, 152), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 152), generator=generator, dtype=torch.int8)
    try:
        product = int_mm(a, b.T)
    except RuntimeError:
        return False
    return torch.equal(product, a.to(torch.int32) @ b.to(torch.int32).T)


class Int8Bank:
    """The bank in 8 bits, ready to rank the entries nearest to queries.

    A key is one integer product of an augmented query and an augmented
    bank row: the query's int8 values followed by ``n_high`` columns of 127
    and one of 1; the bank row's negated int8 values followed by the digits
    of its half squared norm ``h = 127 * (sum of the high digits) + low
    digit``, each digit in [0, 127]. The product is ``h - q.b`` in integer
    steps, which ranks bank rows as the squared distance to ``q`` does.
    Real features need only a few high digits, as a squared norm stays far
    below ``n_features`` times the largest squared value (docs/results.rst,
    "Prediction stages on the CPU", "Earlier measurements").

    Parameters
    ----------
    bank : torch.Tensor of shape (n_entries, n_features)
        Float32 bank on the CPU.

    Attributes
    ----------
    center : torch.Tensor of shape (n_features,)
        Mean bank row, subtracted from the bank and from each query.
    scale : float
        Value of one integer step, for the bank and its queries alike.
    augmented : torch.Tensor of shape (n_entries, n_features + n_high + 1)
        ``-round((bank - center) / scale)`` and the digits of the half squared norms,
        int8.
    """

    def __init__(self, bank):
        # Distances do not change when bank and queries move together;
        # centred, features with a large common offset keep their
        # differences in the 8 bits.
        self.center = bank.mean(dim=0) if len(bank) else bank.new_zeros(bank.shape[1])
        bank = bank - self.center
        largest = float(bank.abs().max()) if bank.numel() else 0.0
        self.scale = largest / _LEVELS if largest > 0 else 1.0
        negated = torch.round(bank / -self.scale).to(torch.int8)
        half_norms = torch.round(
            (bank.double() ** 2).sum(dim=1) / (2 * self.scale**2)
        ).to(torch.int64)
        high, low = half_norms // _LEVELS, half_norms % _LEVELS
        largest_high = int(high.max()) if len(high) else 0
        n_high = max(1, -(-largest_high // _LEVELS))
        # Spread ``high`` over n_high digits: full ones first, then the rest.
        filled = torch.arange(n_high) * _LEVELS
        high_digits = (high[:, None] - filled[None, :]).clamp(0, _LEVELS)
        self.augmented = torch.cat(
            [negated, high_digits.to(torch.int8), low[:, None].to(torch.int8)], 1
        )
        self._constant_columns = torch.tensor(
            [_LEVELS] * n_high + [1], dtype=torch.int8
        )

    def quantise(self, queries):
        """Augmented int8 queries, and which of them lie beyond the bank's range.

        Parameters
        ----------
        queries : torch.Tensor of shape (n_queries, n_features)
            Float32 queries.

        Returns
        -------
        quantised : torch.Tensor of shape (n_queries, n_features + n_high + 1)
            ``round((queries - center) / scale)`` and the constant columns, int8;
            meaningless on clipped rows.
        clipped : torch.Tensor of shape (n_queries,)
            True for the rows with a value beyond ``127 * scale``.
        """
        # Few passes over the queries: each costs as much as a slice of the
        # product when the cores are shared.
        steps = (queries - self.center).mul_(1.0 / self.scale).round_()
        lowest, highest = steps.aminmax(dim=1)
        clipped = (lowest < -_LEVELS) | (highest > _LEVELS)
        n_features = queries.shape[1]
        quantised = torch.empty(
            (len(queries), n_features + len(self._constant_columns)),
            dtype=torch.int8,
        )
        quantised[:, :n_features] = steps.clamp_(-_LEVELS, _LEVELS)
        quantised[:, n_features:] = self._constant_columns
        return quantised, clipped

    def keys(self, quantised, start, stop):
        """Ranking keys of bank rows ``start:stop`` for the quantised queries.

        ``(|q - b|^2 - |q - center|^2) / (2 scale^2)``, up to rounding:
        smaller is nearer, in int32.
        """
        return torch._int_mm(quantised, self.augmented[start:stop].T)
