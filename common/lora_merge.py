"""LoRA files as data: read our exports, attach them as named peft adapters, and merge several
into one (Flow-OPD's cold start, ALGORITHMS.md §7.4).

A LoRA here is (config dict, state dict) with peft keys `<module>.lora_A.weight` (r × in) and
`<module>.lora_B.weight` (out × r); the module's weight delta is ΔW = (alpha / r)·B·A.
Two merges of K LoRAs with weights w_k (normalised to sum 1):

- `factor_average` (the public Flow-OPD merge): A = Σ w_k A_k, B = Σ w_k B_k, the first config.
  Its delta is (Σ_i w_i B_i)(Σ_j w_j A_j) = Σ_k w_k² B_k A_k + Σ_{i≠j} w_i w_j B_i A_j: each
  teacher's own delta weighted w_k² (1/K², not 1/K) plus cross terms B_i A_j that belong to no
  teacher; harmless only when the teachers share nearly the same A. Needs equal ranks and alphas.
- `delta_average`: ΔW = Σ_k w_k (alpha_k / r_k) B_k A_k exactly, brought back to rank `rank`
  (default: the first LoRA's) by a truncated SVD, computed without forming ΔW: with the stacked
  factors B_cat = [w_k s_k B_k] (out × Kr) and A_cat = [A_k] (Kr × in), QR both, SVD the small
  Kr × Kr core. Exact whenever rank(ΔW) ≤ rank (e.g. K identical LoRAs, or rank ≥ K·r); the new
  factors are balanced (B = U·√S, A = √S·Vᵀ) and rescaled so the first LoRA's alpha/r is kept.

Launch:
    python -m common.lora_merge --method delta_average --output runs/opd_init \
        --loras runs/t_count/final/peft runs/t_pos runs/t_attr   # a run directory means its final/peft
    # writes runs/opd_init/peft (adapter_config.json + adapter_model.safetensors) and
    # runs/opd_init/diffusers (pytorch_lora_weights.safetensors), the layout of a run's final/
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Optional

import torch

METHODS = ("factor_average", "delta_average")
PEFT_FILE, PEFT_CONFIG, DIFFUSERS_FILE = "adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------------------- reading / writing


def resolve_lora_dir(path):
    """(kind, directory) for a PEFT adapter dir, our diffusers export, or a run / `final/` dir
    (its `final/peft`, else `final/diffusers`)."""
    root = Path(path)
    for kind, directory, marker in (("peft", root, PEFT_CONFIG), ("peft", root / "peft", PEFT_CONFIG),
                                    ("peft", root / "final" / "peft", PEFT_CONFIG),
                                    ("diffusers", root, DIFFUSERS_FILE), ("diffusers", root / "diffusers", DIFFUSERS_FILE),
                                    ("diffusers", root / "final" / "diffusers", DIFFUSERS_FILE)):
        if (directory / marker).is_file():
            return kind, directory
    raise FileNotFoundError(f"{path}: no LoRA there (expected a PEFT adapter dir with {PEFT_CONFIG}, a diffusers "
                            f"dir with {DIFFUSERS_FILE}, or a run directory with final/peft)")


def read_lora(path):
    """(config dict, state dict of fp32 tensors with peft keys) of a LoRA on disk."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    kind, directory = resolve_lora_dir(path)
    if kind == "peft":
        config = json.loads((directory / PEFT_CONFIG).read_text())
        state = load_file(str(directory / PEFT_FILE))
        state = {k.removeprefix("base_model.model."): v.float() for k, v in state.items()}  # peft save_pretrained
    else:
        with safe_open(str(directory / DIFFUSERS_FILE), "pt") as handle:
            metadata = handle.metadata() or {}
        if "lora_adapter_metadata" not in metadata:  # without it alpha would silently become r
            raise ValueError(f"{path}: the diffusers LoRA has no LoraConfig metadata; use its peft/ export")
        raw = json.loads(metadata["lora_adapter_metadata"])
        config = {k.removeprefix("transformer."): v for k, v in raw.items() if k.startswith("transformer.")}
        state = {k.removeprefix("transformer."): v.float() for k, v in load_file(str(directory / DIFFUSERS_FILE)).items()
                 if k.startswith("transformer.")}
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{path}: per-module {key} is not supported")
    if config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{path}: DoRA / rsLoRA adapters are not supported (their delta is not (alpha/r)·B·A)")
    return config, state


def lora_config(config):
    """A peft LoraConfig from a config dict (unknown keys from other peft versions dropped)."""
    from peft import LoraConfig

    known = {f.name for f in fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in config.items() if k in known})


def attach_lora(transformer, config, state, adapter_name):
    """Add `state` as the peft adapter `adapter_name` of `transformer` (a diffusers model) and
    check every LoRA tensor found its module. Leaves `adapter_name` active (peft's behaviour)."""
    import warnings

    from peft import set_peft_model_state_dict

    with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
        warnings.simplefilter("ignore")
        transformer.add_adapter(lora_config(config), adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k and "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"LoRA {adapter_name!r} does not fit this model: {len(result.unexpected_keys)} unexpected and "
                         f"{len(missing)} missing tensors (e.g. {(list(result.unexpected_keys) + missing)[:2]})")


def load_lora_adapter(transformer, path, adapter_name):
    """read_lora + attach_lora; returns the config dict."""
    config, state = read_lora(path)
    attach_lora(transformer, config, state, adapter_name)
    return config


def save_lora(directory, config, state):
    """Write `directory/peft` and `directory/diffusers` (the layout of a run's `final/`)."""
    from diffusers.loaders import SD3LoraLoaderMixin
    from safetensors.torch import save_file

    directory = Path(directory)
    (directory / "peft").mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(directory / "peft" / PEFT_FILE))
    plain = {k: sorted(v) if isinstance(v, (set, tuple)) else v for k, v in config.items()}
    (directory / "peft" / PEFT_CONFIG).write_text(json.dumps(plain, indent=2))
    SD3LoraLoaderMixin.save_lora_weights(directory / "diffusers", transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=lora_config(config).to_dict())
    return directory


# ------------------------------------------------------------------------------- the merge maths


def lora_scale(config):
    return config["lora_alpha"] / config["r"]


def lora_modules(state):
    """Module names of a LoRA state dict (sorted)."""
    return sorted(k[:-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))


def lora_deltas(config, state):
    """{module: ΔW = (alpha/r)·B·A} in fp32."""
    scale = lora_scale(config)
    return {m: scale * state[f"{m}.lora_B.weight"].float() @ state[f"{m}.lora_A.weight"].float()
            for m in lora_modules(state)}


def _normalised(weights, count):
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need {count} non-negative weights with a positive sum, got {weights}")
    return [w / sum(weights) for w in weights]


def _check_same_modules(states):
    modules = lora_modules(states[0])
    for k, state in enumerate(states[1:], start=1):
        if lora_modules(state) != modules:
            raise ValueError(f"LoRA {k} targets other modules than LoRA 0; merge LoRAs trained with the same targets")
    return modules


def factor_average(configs, states, weights=None):
    """The public merge: average A and B separately (equal ranks and alphas required)."""
    weights = _normalised(weights, len(states))
    _check_same_modules(states)
    for k, config in enumerate(configs[1:], start=1):
        if (config["r"], config["lora_alpha"]) != (configs[0]["r"], configs[0]["lora_alpha"]):
            raise ValueError(f"factor_average needs equal rank and alpha: LoRA {k} has r={config['r']} "
                             f"alpha={config['lora_alpha']}, LoRA 0 r={configs[0]['r']} alpha={configs[0]['lora_alpha']}")
    merged = {key: sum(w * state[key].float() for w, state in zip(weights, states)) for key in states[0]}
    return dict(configs[0]), merged


def delta_average(configs, states, weights=None, rank=None):
    """Average the deltas Σ w_k (alpha_k/r_k) B_k A_k, then truncated SVD to `rank` (default: the
    first LoRA's). The result keeps the first LoRA's alpha/r, so it trains like the teachers did."""
    weights = _normalised(weights, len(states))
    modules = _check_same_modules(states)
    rank = int(rank or configs[0]["r"])
    scale = lora_scale(configs[0])
    alpha = scale * rank
    config = dict(configs[0], r=rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha)
    merged = {}
    for m in modules:
        b_cat = torch.cat([w * lora_scale(c) * s[f"{m}.lora_B.weight"].double() for w, c, s in zip(weights, configs, states)], 1)
        a_cat = torch.cat([s[f"{m}.lora_A.weight"].double() for s in states], 0)
        q_b, r_b = torch.linalg.qr(b_cat)            # (out, Kr), (Kr, Kr)
        q_a, r_a = torch.linalg.qr(a_cat.T)          # (in, Kr), (Kr, Kr)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)     # ΔW = q_b·(u s vh)·q_aᵀ
        keep = min(rank, len(s))
        root = torch.sqrt(s[:keep] / scale)
        b = (q_b @ u[:, :keep]) * root               # (out, keep)
        a = root[:, None] * (vh[:keep] @ q_a.T)      # (keep, in)
        if keep < rank:  # fewer singular directions than the rank: pad with zeros (same delta)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - keep)], 1)
            a = torch.cat([a, a.new_zeros(rank - keep, a.shape[1])], 0)
        merged[f"{m}.lora_A.weight"], merged[f"{m}.lora_B.weight"] = a.float(), b.float()
    return config, merged


def merge_loras(paths, method="delta_average", weights=None, rank=None):
    """(config, state) of the merge of the LoRAs at `paths`."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {METHODS}")
    loaded = [read_lora(p) for p in paths]
    configs, states = [c for c, _ in loaded], [s for _, s in loaded]
    if method == "factor_average":
        if rank is not None and rank != configs[0]["r"]:
            raise ValueError("factor_average keeps the teachers' rank; --rank applies to delta_average only")
        return factor_average(configs, states, weights)
    return delta_average(configs, states, weights, rank)


# ------------------------------------------------------------------------------- CLI


@dataclass
class Args:
    loras: tuple[str, ...]
    """LoRAs to merge: PEFT adapter dirs, diffusers exports, or run directories (their final/peft)"""
    output: str
    """directory to write (gets peft/ and diffusers/, like a run's final/)"""
    method: Literal["factor_average", "delta_average"] = "delta_average"
    """factor_average: average A and B (public Flow-OPD); delta_average: average B·A, SVD to --rank"""
    weights: Optional[tuple[float, ...]] = None
    """one weight per LoRA (normalised to sum 1); default equal"""
    rank: Optional[int] = None
    """delta_average: rank of the result (default: the first LoRA's)"""


def main(args: Args):
    if len(args.loras) < 1:
        raise SystemExit("error: give at least one LoRA")
    config, state = merge_loras(args.loras, args.method, args.weights, args.rank)
    out = save_lora(args.output, config, state)
    print(f"{args.method} of {len(args.loras)} LoRAs (rank {config['r']}, alpha {config['lora_alpha']}) -> {out}")
    return out


if __name__ == "__main__":
    import tyro

    cli_args = tyro.cli(Args, description=__doc__)
    try:
        main(cli_args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
