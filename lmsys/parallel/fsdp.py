"""FSDP (ZeRO-3) pieces that speak the rule table: a weight all-gathered over `fsdp` once, with
its gradient reduce-scattered back, and the embedding lookup that leaves the table in its
fsdp shards. The model calls them; which mesh axes move is the rule table's business.
"""

from __future__ import annotations

import dataclasses

import jax


def fsdp_gather(w, rules, axes):
    """`w` (laid out by the rule table under logical `axes`) all-gathered over `fsdp`; its
    gradient is pinned back to the fsdp-split layout right away, which the partitioner turns
    into a reduce-scatter (not an all-reduce of the whole gradient and a slice)."""
    gathered = rules.without(("fsdp",))

    @jax.custom_vjp
    def gather(w):
        return gathered.constrain(w, axes)

    def fwd(w):
        return gather(w), None

    def bwd(_, g):
        return (rules.constrain(g, axes),)

    gather.defvjp(fwd, bwd)
    return gather(w)


def embed_lookup(embed_VD, tokens_BT, rules=None):
    """The rows of the table for `tokens_BT`, laid out [batch, seq, d_model] like the activations.

    With the table's d_model split over `fsdp` (ZeRO-3), the table never moves: the token ids are
    all-gathered over fsdp (4 bytes a token), each device looks up every row of its fsdp group
    in its own d_model slice, and an all-to-all hands each device its batch rows whole. The
    gradient takes the same way back and lands in the table's own slice with no reduce-scatter
    (gathering the table instead costs the whole table in each direction).
    """
    if rules is None:
        return embed_VD[tokens_BT]
    if rules.mesh.shape.get("fsdp", 1) == 1:
        return rules.constrain(embed_VD[tokens_BT], ("batch", "seq", None))
    group = dataclasses.replace(rules, table={**rules.table, "batch": tuple(
        a for a in rules.table["batch"] if a != "fsdp")})
    tokens_BT = group.constrain(tokens_BT, ("batch", "seq"))
    x_BTD = group.constrain(embed_VD[tokens_BT], ("batch", "seq", "embed"))
    return rules.constrain(x_BTD, ("batch", "seq", None))
