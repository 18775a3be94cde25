"""Extending a base that already ships scaled RoPE (Llama-3.1/3.2 `llama3`, Qwen2.5/Qwen3 `yarn`, Phi-3.5 `longrope`,
Gemma-3 `linear` on its global layers): the scheme to write, composed on the native one, or a refusal saying why.

    d = on_native({"rope_type": "llama3", "max_position_embeddings": 262144}, native=config.rope_parameters,
                  max_positions=config.max_position_embeddings)
    # -> llama3, factor 32 over the pretrained 8192 (Llama-3.1's x8 times 4), low/high_freq_factor kept

The rule: a natively scaled base is extended with its own scheme, over its pretrained original length L0 (Llama-3.1:
8192, not its max_position_embeddings), with the total factor F = target / L0 = f_native * s, and the native
scheme's other parameters. `rope.factor` on such a base counts from L0 too (it is the F written to config.json).
The result is one transformers `rope_parameters` dict, so the export stays loadable by plain transformers.

Why each composition is the native scheme with the product factor (theta_i = base^(-2i/d), s = F / f_native):
- linear o linear: theta_i / f_native / s = theta_i / F, exactly; every pair is the native one divided by s.
- llama3 o llama3: llama3 keeps pairs whose wavelength is below L0/high_freq_factor (theta_i) and divides those
  above L0/low_freq_factor by the factor. With F, the kept pairs stay theta_i (as native), the interpolated ones
  become theta_i / F = (native) / s, and the band between is llama3's own smooth blend for F. The thresholds depend
  on L0 and the freq factors only, so they are the native ones.
- yarn o yarn: YaRN's ramp over pairs depends on L0, beta_fast, beta_slow, the base and d, not on the factor. So
  extrapolated pairs stay theta_i, interpolated pairs become native / s, ramp pairs are YaRN's blend for F, and the
  attention factor is YaRN's 0.1 ln F + 1 for the total. This is how the YaRN paper extended its s=16 checkpoint to
  s=32 (arXiv 2309.00071, section 4.1): YaRN with the larger factor over the original length.
- longrope o longrope: LongRoPE's per-pair factors come from a search for one target length; no formula gives
  them for a longer one. Give your own `long_factor` (e.g. from a LongRoPE search); the short factors (used up to
  L0) stay the native ones, and the attention factor is LongRoPE's sqrt(1 + ln F / ln L0) for the total F, as
  transformers computes it from `factor`.
Not composed, refused with the reason: a scheme other than the native one (e.g. linear on llama3 would divide
the high-frequency pairs llama3 keeps, which no single llama3 dict expresses; ntk writes a new base under the
default type and would drop the native scaling), a factor that does not go beyond the native one, a changed
original length, base or by-parts parameter, and a native `dynamic` (not a trained scaling).
"""

from __future__ import annotations

from typing import Any

COMPOSABLE = ("linear", "yarn", "llama3", "longrope")
# The native scheme's parameters that define its shape; the composition keeps them.
KEPT = {"linear": (), "yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
        "llama3": ("low_freq_factor", "high_freq_factor"), "longrope": ("short_factor",)}


def is_scaled(native: dict[str, Any]) -> bool:
    return native.get("rope_type", "default") != "default"


def native_scaling(native: dict[str, Any], max_positions: int) -> tuple[float, int]:
    """(factor, pretrained original length) of a base's own scaling.

    longrope without `factor` (Phi-3): max_position_embeddings / original, as transformers computes it. linear has
    no original length: the context it was made for (max_position_embeddings) divided by its factor.
    """
    factor = native.get("factor")
    original = native.get("original_max_position_embeddings")
    if factor is None and original:
        factor = max_positions / original
    factor = float(factor or 1.0)
    if original is None:
        original = round(max_positions / factor)
    return factor, int(original)


def on_native(d: dict[str, Any], native: dict[str, Any], max_positions: int, what: str = "the base model") -> dict:
    """The user's partial rope dict `d` made explicit on top of the native scaling `native`; ValueError (one line per
    problem, each naming the key) when it cannot compose."""
    nt, rt = native.get("rope_type"), d.get("rope_type")
    f_native, original = native_scaling(native, max_positions)
    ships = f"{what} ships rope_type {nt!r} x{f_native:g} over its pretrained {original} tokens"
    keep = "keep the native scaling with rope.rope_type: none"
    if nt not in COMPOSABLE:
        raise ValueError(f"rope.rope_type: {ships}; longctx composes only on {', '.join(COMPOSABLE)} bases "
                         f"({nt} is not a scaling a model was trained with); {keep}")
    if rt != nt:
        why = {"linear": "linear would divide every pair, also those the native scheme keeps unscaled",
               "ntk": "ntk writes a new base under the default type, which drops the native scaling",
               "dynamic": "dynamic replaces the native scaling"}.get(rt, f"{rt} and {nt} scale different pairs")
        raise ValueError(f"rope.rope_type: {ships}; extending it with {rt!r} would replace or distort it ({why}; no "
                         f"single rope_parameters dict holds both). Use rope_type {nt!r}: {nt} with a larger factor "
                         f"over the same {original} tokens is the composition transformers can load; or {keep}")
    errors = []
    if d.get("original_max_position_embeddings") not in (None, original):
        errors.append(f"rope.original_max_position_embeddings: {d['original_max_position_embeddings']} differs "
                      f"from the base's pretrained {original}; the composition is defined over the base's own "
                      "original length (leave the key out)")
    if d.get("rope_theta") not in (None, native.get("rope_theta")):
        errors.append(f"rope.rope_theta: {d['rope_theta']} differs from the base's {native.get('rope_theta')}; a "
                      "new base under the native scaling is not a composition (leave the key out)")
    for key in KEPT[nt]:
        if key in native and d.get(key) not in (None, native[key]):
            errors.append(f"rope.{key}: {d[key]!r} differs from the base's {native[key]!r}; composing keeps the "
                          f"native {nt} shape (leave the key out)")
    factor = d.get("factor")
    if factor is None and d.get("max_position_embeddings"):
        factor = d["max_position_embeddings"] / original
    if factor is None or factor <= f_native:
        target = f"{factor * original:.0f} tokens, factor {factor:g}" if factor else "no target length"
        errors.append(f"rope.factor: {ships} ({round(f_native * original)} tokens); {target} does not go beyond it. "
                      f"On such a base the factor counts from {original} tokens: give a factor above {f_native:g} "
                      f"or a longer max_position_embeddings / train.seq_len, or {keep}")
    if nt in ("yarn", "longrope") and "attention_factor" in native and d.get("attention_factor") is None:
        errors.append(f"rope.attention_factor: the base's {nt} sets attention_factor {native['attention_factor']} "
                      f"for its factor {f_native:g}; give the one for the composed factor explicitly")
    if nt == "longrope" and not d.get("long_factor"):
        errors.append("rope.long_factor: LongRoPE's per-pair factors come from a search for one target length and "
                      "no formula extends them; give your own long_factor for the new length (the native "
                      "short_factor is kept)")
    if errors:
        raise ValueError("\n".join(errors))
    kept = {k: native[k] for k in KEPT[nt] if k in native}
    return {**kept, **{k: v for k, v in d.items() if v is not None}, "rope_type": nt, "factor": float(factor),
            "original_max_position_embeddings": original}
