"""Class atoms of ``k`` and ``h`` for the per-head key order tests."""


def class_source(m, c, b, H, form):
    """A class atom of ``k`` and ``h``: residues with offsets, stripes of ``b`` keys,
    negated, per-head lists, a modulus of ``H``, unions and conjunctions of two."""
    return {1: f"(k - {c}) % {m} == h % {m}", 2: f"(k // {b}) % {m} == (h + {c}) % {m}",
            3: f"k % {m} == h", 4: f"k % {m} != h % {m}",
            5: f"k % {m} == {[(c + 3 * i) % (m + 1) for i in range(H)]}[h]",
            6: f"(k + {c}) % H == h",
            7: f"k % {m} == h % {m} | k % {m} == (h + {c}) % {m}",
            8: f"(k // {b}) % {m} == h % {m} & k % 2 == 0"}[form]
