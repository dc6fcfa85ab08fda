"""Pivotal tuning (`train_text_encoder_ti`): the identifier becomes new tokens whose embeddings train.

As diffusers' `train_dreambooth_lora_sdxl_advanced.py` does it: the identifier (`token_abstraction`, e.g.
`sks`) is rewritten in every prompt into `num_new_tokens_per_abstraction` new tokens (`<s0><s1>`), added to
each CLIP tokenizer; their embedding rows start from `initializer_concept`'s (default: the class noun) and
train together with the LoRA adapters for the first `train_text_encoder_ti_frac` of the steps (then their
learning rate is 0: the "pivot"). LoRA, DoRA and the full fine-tune honour the switch through this module (a full
fine-tune's pipeline is saved with the base vocabulary, `base_vocabulary`, and the new tokens go beside it).

Only the new rows train, and the rest of each embedding matrix stays bit-identical: the new rows live in a
separate parameter (`NewTokenEmbedding.new`) beside the untouched frozen table, so neither the optimizer's
weight decay nor its moments can reach an old row (diffusers instead trains the whole matrix and copies the
old rows back after each step).

Files: `<run name>_emb.safetensors` in the run folder, diffusers' advanced-script format (`clip_l`, plus
`clip_g` for SDXL; (tokens, dim) float32 each; the identifier and tokens in its metadata), which
`pipe.load_textual_inversion(state["clip_l"], token=["<s0>", "<s1>"], ...)` loads. `nanobooth export` writes the
A1111/ComfyUI embedding (webui_tensors) beside the LoRA (`emb_params` for SD 1.x/2.x, `clip_l` + `clip_g` for SDXL).
"""

from __future__ import annotations

import copy
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..core.config_values import TI_GROUP, identifier_words, new_tokens, one_identifier
from ..core.run_folder import EMB_SUFFIX

ENCODER_KEYS = ("clip_l", "clip_g")  # text_encoder, text_encoder_2: the names A1111, ComfyUI and diffusers' script use
TOKEN_MAP = "nanobooth_token_map"  # the pipeline attribute render() rewrites prompts with

log = logging.getLogger("nanobooth")


class NewTokenEmbedding(nn.Module):
    """A CLIP token embedding with `n` rows appended: ids < V read the frozen `base` table, ids V..V+n-1
    read the trainable `new` (n, dim). Output (..., dim) in the base table's dtype."""

    def __init__(self, base: nn.Embedding, init: torch.Tensor, base_tokenizer=None):
        super().__init__()
        self.base = base
        self.new = nn.Parameter(init.detach().clone().float())
        self.base_tokenizer = base_tokenizer  # the tokenizer before the new tokens (base_vocabulary saves it)

    @property
    def weight(self) -> torch.Tensor:  # what transformers' resize/inspection code reads (a copy: no training through it)
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)]).detach()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        v = self.base.num_embeddings
        out = self.base(ids.clamp(max=v - 1))
        is_new = (ids >= v).unsqueeze(-1)
        return torch.where(is_new, self.new[(ids - v).clamp(min=0)].to(out.dtype), out)


def identifier(cfg) -> str:
    """token_abstraction, else the one word of instance_prompt that class_prompt lacks. ConfigError if none or several."""
    from ..core.config import ConfigError

    if ident := one_identifier(cfg):
        return ident
    extra = identifier_words(cfg)
    raise ConfigError(f"config key 'token_abstraction': instance_prompt '{cfg.instance_prompt}' has {len(extra)} words that "
                      f"class_prompt lacks ({', '.join(extra) or 'none'}); set token_abstraction=<the identifier word>")


def token_map(cfg) -> dict[str, str]:
    """{identifier: "<s0><s1>"}: the rewrite every prompt gets (training, validation, generate)."""
    return {identifier(cfg): "".join(new_tokens(cfg))}


def rewrite(prompt: str, tokens: dict[str, str] | None) -> str:
    """`prompt` with each identifier (a whole word) replaced by its new tokens."""
    for word, toks in (tokens or {}).items():
        prompt = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", toks, prompt)
    return prompt


def _token_embedding(te) -> nn.Module | None:
    """A CLIP encoder's `embeddings` (holding `token_embedding`); None for an encoder without one (T5)."""
    return getattr(getattr(te, "text_model", te), "embeddings", None)


def trained_encoders(family, text_encoders: list) -> list[int]:
    """Indices of the CLIP encoders that get new tokens: those the family reads (not SD3's T5), at most two."""
    return [i for i, te in enumerate(text_encoders)
            if i < len(ENCODER_KEYS) and family.layers_read(i, te.config.num_hidden_layers)]


def check_family(family, cfg) -> None:
    """ConfigError unless the family is SD or SDXL: diffusers' SD3/FLUX pipelines have no load_textual_inversion
    to read the embeddings back. train.py calls it as soon as the model loads, before the run folder is made."""
    from ..core.config import ConfigError

    if family.name in ("sd", "sdxl"):
        return
    if cfg.method == "textual_inversion":
        raise ConfigError(f"config key 'method': textual_inversion is implemented for SD and SDXL, not {family.name}; "
                          "use method=lora (or dora) for this model")
    raise ConfigError(f"config key 'train_text_encoder_ti': pivotal tuning is implemented for SD and SDXL, not {family.name}; "
                      "set train_text_encoder_ti=false for this model")


def attach(family, tokenizers: list, text_encoders: list, cfg) -> dict[str, str]:
    """Add the new tokens to each trained encoder's tokenizer and a NewTokenEmbedding to the encoder (rows
    from initializer_concept, cycled; draws no random numbers). Returns token_map(cfg). ConfigError for a
    token that already exists or an initializer the tokenizer cannot encode."""
    from ..core.config import ConfigError

    check_family(family, cfg)
    toks, tmap = new_tokens(cfg), token_map(cfg)
    concept = cfg.initializer_concept or ((cfg.class_prompt or "").split() or [""])[-1]
    for i in trained_encoders(family, text_encoders):
        tok, emb = tokenizers[i], _token_embedding(text_encoders[i])
        if any(t in tok.get_vocab() for t in toks):
            raise ConfigError(f"config key 'num_new_tokens_per_abstraction': the tokenizer already has {toks}; "
                              "train_text_encoder_ti needs a base model without them")
        base = emb.token_embedding
        if len(tok) != base.num_embeddings:  # the new ids must be the rows after the table
            raise ConfigError(f"config key 'train_text_encoder_ti': tokenizer {i} has {len(tok)} tokens but its encoder "
                              f"{base.num_embeddings} embedding rows; this model cannot take new tokens")
        init_ids = tok.encode(concept or "", add_special_tokens=False)
        if not init_ids:
            raise ConfigError(f"config key 'initializer_concept': '{concept}' encodes to no token; give a word such as the class noun")
        before = copy.deepcopy(tok)
        tok.add_tokens(toks)
        with torch.no_grad():
            init = base.weight[torch.tensor([init_ids[k % len(init_ids)] for k in range(len(toks))], device=base.weight.device)]
        emb.token_embedding = NewTokenEmbedding(base, init, before)
    return tmap


@contextmanager
def base_vocabulary(pipe):
    """Inside, `pipe` (sharing the training modules) is its base model's vocabulary again: each encoder's
    NewTokenEmbedding swapped back to its frozen-or-trained base table and each tokenizer to its copy from
    before the new tokens; restored on exit. A full fine-tune saves its pipeline this way, so the folder is a
    plain SD/SDXL model that any tool loads, with the new tokens beside it in the embedding file."""
    swapped = []
    for te_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        te = getattr(pipe, te_name, None)
        holder = _token_embedding(te)  # None for T5 (FLUX/SD3): it never has new rows
        m = getattr(holder, "token_embedding", None)
        if isinstance(m, NewTokenEmbedding):
            swapped.append((holder, m, tok_name, getattr(pipe, tok_name)))
            holder.token_embedding = m.base
            setattr(pipe, tok_name, m.base_tokenizer)
    try:
        yield pipe
    finally:
        for holder, m, tok_name, tok in swapped:
            holder.token_embedding = m
            setattr(pipe, tok_name, tok)


def new_params(text_encoders: list) -> list[nn.Parameter]:
    return [m.new for te in text_encoders for m in te.modules() if isinstance(m, NewTokenEmbedding)]


def param_group(text_encoders: list, cfg, scale: float) -> dict:
    """The optimizer group of the new rows: text_encoder_lr (default learning_rate), as diffusers' script."""
    lr = cfg.learning_rate if cfg.text_encoder_lr is None else cfg.text_encoder_lr
    return {"params": new_params(text_encoders), "lr": lr * scale, "name": TI_GROUP}


def pivot(optimizer, step: int, cfg) -> None:
    """From step int(new_tokens_frac * max_train_steps) on, the new rows stop training (lr 0; the LR scheduler
    sets it back after each step, so this runs before every optimizer step). Textual inversion's rows train to the end."""
    if step >= int(cfg.new_tokens_frac * cfg.max_train_steps):
        for g in optimizer.param_groups:
            if g.get("name") == TI_GROUP:
                g["lr"] = 0.0


def trained_rows(family, text_encoders: list) -> dict[str, torch.Tensor]:
    """{"clip_l": (n, dim), ["clip_g": ...]} float32 on the CPU."""
    out = {}
    for i in trained_encoders(family, text_encoders):
        m = _token_embedding(text_encoders[i]).token_embedding
        out[ENCODER_KEYS[i]] = m.new.detach().float().cpu().contiguous()
    return out


def emb_file_name(cfg) -> str:
    return Path(cfg.output_dir).name + EMB_SUFFIX


def save(folder: Path, family, text_encoders: list, cfg) -> Path:
    """Write `<run name>_emb.safetensors` (diffusers' advanced-script layout) into `folder`."""
    from safetensors.torch import save_file

    path = Path(folder) / emb_file_name(cfg)
    # method: a full fine-tune's file beside its pipeline is its own (run_folder.result_kind), not a second run's
    meta = {"token_abstraction": identifier(cfg), "tokens": ",".join(new_tokens(cfg)), "method": cfg.method}
    save_file(trained_rows(family, text_encoders), str(path), metadata=meta)
    return path


def find(run_dir) -> Path | None:
    """The run's `*_emb.safetensors`, None without one; RunFolderError when there are several."""
    from ..core.run_folder import RunFolderError

    found = sorted(Path(run_dir).glob("*" + EMB_SUFFIX))
    if len(found) > 1:
        raise RunFolderError(f"'{run_dir}' holds {len(found)} embedding files ({', '.join(p.name for p in found)}): "
                             "it mixes runs; keep the one this run wrote")
    return found[0] if found else None


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, {identifier: "<s0><s1>"}) of an embedding file written by save()."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    toks = meta.get("tokens", "").split(",")
    return tensors, {meta["token_abstraction"]: "".join(toks)} if meta.get("token_abstraction") else {}


def load_into(pipe, path: Path) -> None:
    """Load the embeddings into `pipe` through diffusers' load_textual_inversion (tokens added to each
    tokenizer) and set the identifier's rewrite, which render() applies to every prompt."""
    tensors, tmap = read(path)
    toks = re.findall(r"<s\d+>", next(iter(tmap.values()))) if tmap else []
    for key, te_name, tok_name in zip(ENCODER_KEYS, ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")):
        if key in tensors:
            pipe.load_textual_inversion(tensors[key], token=toks, text_encoder=getattr(pipe, te_name),
                                        tokenizer=getattr(pipe, tok_name))
    setattr(pipe, TOKEN_MAP, tmap)
    for word, tokens in tmap.items():  # newcomer51: nothing said the run's new tokens were in use
        log.info("new tokens from %s: '%s' in every prompt becomes %s", path.name, word, tokens)


def load_beside(pipe, run_dir):
    """`pipe` with the run's `*_emb.safetensors` loaded into it (load_into) where the run has one (pivotal tuning
    beside a LoRA or a full fine-tune); unchanged otherwise. Returns `pipe`."""
    emb = find(run_dir)
    if emb is not None:  # tokens added, the identifier rewritten in every prompt render() gets
        load_into(pipe, emb)
    return pipe


def unload(pipe) -> None:
    """Remove load_into's tokens and rows again (a single-file checkpoint keeps the base vocabulary; the
    embedding goes beside it)."""
    tmap = getattr(pipe, TOKEN_MAP, None)
    if not tmap:
        return
    toks = re.findall(r"<s\d+>", next(iter(tmap.values())))
    for te_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tok = getattr(pipe, tok_name, None)
        if tok is not None and all(t in tok.get_vocab() for t in toks):
            pipe.unload_textual_inversion(tokens=toks, tokenizer=tok, text_encoder=getattr(pipe, te_name))
    setattr(pipe, TOKEN_MAP, {})


def webui_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The embedding as A1111 and ComfyUI load it (a file in their embeddings folder, named in the prompt by
    its file name): SD 1.x/2.x one tensor `emb_params` (tokens, dim), as kohya writes it (A1111 takes a file
    of one tensor, ComfyUI its `clip_l` key or else the first tensor); SDXL `clip_l` and `clip_g`, the keys
    both look up."""
    tensors, _ = read(path)
    return tensors if "clip_g" in tensors else {"emb_params": tensors["clip_l"]}
