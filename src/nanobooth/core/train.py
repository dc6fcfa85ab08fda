"""The DreamBooth training loop: one loop, three switches (method, train_text_encoder, prior).

Read top to bottom: run folder -> models -> class images -> data caches -> optimizer -> loop ->
outputs. Randomness comes from explicit generators (data order, augmentation, noise/timesteps, ToMe),
each checkpointed (generators.py), so resume is bit-exact and validation renders (validation_grid.py)
cannot perturb training.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import step_scores, trackers, validation_loss
from .config import ConfigError, TrainConfig, check_mixed_precision, check_resolution, save_config
from .data import read_subject_meta, resolve_data_dir
from .ema import EMA, EMA_FILE
from .latents import BatchDraw, LatentSource
from .events import Callback, CheckpointSaved, ClassImagesProgress, Done, Emitter, Failed, Step, Stopped, TimeToModel, ValidationLoss
from .generators import Generators
from .losses import dreambooth_loss
from .prepare import class_provenance, input_record, prepare_run
from .optimizers import eval_weights, final_weights, make_optimizer, make_schedule, step_size
from .validation_grid import ValidationGrids
from ..families import cond_batch, cond_to
from ..methods import METHODS
from ..methods import embeddings
from .models import apply_tome, load_components, make_pipeline
from .run_summary import run_summary
from .prior import class_image_set, generate_class_images, missing_indices
from .offload import BlockOffload
from .quantize import quantize_base
from .run_folder import CONFIG, TIME_TO_MODEL, check_finished, class_images_dir, clear_outputs, make_readable, redo_after
from .stop import StopRequest, TrainingInterrupted, how_to_continue
from .ranks import errors_only_off_main, launch_rank

log = logging.getLogger("nanobooth")


class TrainingError(RuntimeError):
    pass


def train(cfg: TrainConfig, should_stop: Callable[[], bool] | None = None, callbacks: Iterable[Callback] = ()) -> Path:
    """Train cfg into cfg.output_dir and return it.

    Ctrl-C, SIGTERM, `should_stop()` returning True (checked once per step) or a callback returning
    events.STOP stop at the next step boundary: a checkpoint of that step is written (rank 0) and
    TrainingInterrupted is raised, saying how to continue (resume_from_checkpoint=latest). A validation
    render that fails is skipped with a warning; the weights are written before the final one.
    `callbacks` get the events of events.py on the main process (their order is documented there).
    Under a launcher only rank 0 logs below ERROR (ranks.py).
    """
    with StopRequest(should_stop, cfg.resume_from_checkpoint) as stop, errors_only_off_main(launch_rank() == 0):
        emit = Emitter(callbacks, on_stop=lambda: stop.request(source="stop request"))
        try:
            return _train(cfg, stop, emit)
        except TrainingInterrupted as e:
            emit(Stopped(e.step, e.checkpoint, str(e)))
            raise
        except Exception as e:
            emit(Failed(f"{type(e).__name__}: {e}"))
            raise


def _train(cfg: TrainConfig, stop: StopRequest, emit: Emitter) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from .threads import apply_threads

    apply_threads(cfg.num_threads)  # as many CPU threads as there are free cores (num_threads=N to set)
    t_start = time.time()  # time to model: photos in -> weights written (TimeToModel)
    # --- run folder ------------------------------------------------------------------------------------
    run_dir, instance_set = prepare_run(cfg)
    # A distributed launch on a machine without CUDA means CPU processes over gloo; accelerate only
    # picks that when asked for the CPU explicitly.
    cpu_world = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    check_mixed_precision(cfg.mixed_precision, cpu=cpu_world)  # before the Accelerator: its state is per process
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
                              cpu=cpu_world, **trackers.accelerator_kwargs(cfg, run_dir))
    main = emit.main = accelerator.is_main_process  # callbacks run on the main process only
    resume = ckpt.resolve_resume(run_dir, cfg.resume_from_checkpoint)
    inputs = input_record(cfg, run_dir) if resume else None  # hashed once: checked here, recorded in checkpoints
    resume_step = 0
    if resume:  # refused here, before anything is written
        resume_step = ckpt.check_resume(resume, cfg.max_train_steps, inputs)
        check_finished(run_dir, cfg.max_train_steps)
    set_seed(cfg.seed)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    # --- models (a bad `model` fails here, before the run folder exists) -----------------------------------
    c = load_components(cfg.model, cfg.revision, cfg.single_file_config, cfg.allow_pickle)
    step = check_resolution(cfg.resolution, c.vae.config, c.unet.config, c.family.latent_patch)
    if cfg.enable_bucket and cfg.bucket_reso_steps % step:
        raise ConfigError(f"config key 'bucket_reso_steps': {cfg.bucket_reso_steps} is not a multiple of {step}, which this "
                          f"model needs; use {-(-cfg.bucket_reso_steps // step) * step}")
    if cfg.trains_embeddings:
        embeddings.check_family(c.family, cfg)  # SD/SDXL only: refused before the run folder is made
    objective = c.family.objective(c.noise_scheduler, cfg)  # noise, timesteps, noisy input, target, loss weights; may refuse cfg
    c.family.check_sampling(cfg, c.unet.config)  # validation renders that this model cannot sample as asked: refused now
    method = METHODS[cfg.method]()  # what trains, optimizer groups, what is saved (methods/base.py)
    method.check(c.family, c.unet, c.text_encoders, cfg)  # e.g. a LoRA target that names no module: refused now
    if cfg.keep_best and accelerator.distributed_type == "FSDP":
        raise ConfigError("config key 'keep_best': not supported with FSDP (rank 0 holds only a shard of the weights to keep); "
                          "use keep_best=false or a DDP launch")
    scorer = step_scores.build(cfg, resolve_data_dir(cfg.instance_data_dir), read_subject_meta(resolve_data_dir(cfg.instance_data_dir))) \
        if main else None  # validation_scores / keep_best: a way to score each validation step, or refused before anything is written
    keeper = step_scores.KeepBest(cfg, run_dir) if scorer else None
    quantize_base(c.unet, cfg, weight_dtype, device)  # base_quantization: before it reaches the device and gets adapters
    offload = BlockOffload(c.unet, cfg.offload_blocks, device) if cfg.offload_blocks else None  # before the device: it need not fit
    if offload and device.type == "cpu":
        log.warning("offload_blocks=%d has no effect: this run has no accelerator (the blocks already live in CPU memory)", cfg.offload_blocks)
    if main:
        if cfg.overwrite and not resume and run_dir.is_dir():
            clear_outputs(run_dir)  # every output of the earlier run, whatever its kind; class images stay
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG)
    if tracker := trackers.start(accelerator, cfg, resume_step):  # report_to: one more events callback (trackers.py)
        emit.callbacks.append(tracker)
    fam, vae, text_encoders, unet = c.family, c.vae, c.text_encoders, c.unet
    if cfg.pretrained_vae_model_name_or_path:  # e.g. SDXL's fp16-fixed VAE
        from diffusers import AutoencoderKL

        vae = c.vae = c.components["vae"] = AutoencoderKL.from_pretrained(cfg.pretrained_vae_model_name_or_path)
    apply_tome(unet, cfg.tome_ratio, fam.tome_max_downsample)
    # The denoiser reaches the device only after the frozen text encoders have encoded every prompt and gone back
    # to the CPU (issue #21: FLUX's T5-XXL beside the transformer was the run's peak). Sooner only where it must be:
    # class images to make need the whole pipeline. (nf4 is quantized on the CPU, in quantize_base, so it waits too.)
    def place_denoiser() -> None:  # again after attach: peft's new adapters (made on the CPU) go to the device too
        offload.place(unet) if offload else unet.to(device)

    for m in (vae, *text_encoders, unet):
        m.requires_grad_(False)
    for m in (vae, *text_encoders):
        m.to(device)

    # --- class images (before any adapter exists: they must come from the base model) -------------------
    prior = cfg.with_prior_preservation
    class_dir = class_images_dir(cfg, run_dir)
    t_class = time.time()
    if prior:
        def class_progress(done: int, total: int) -> None:
            emit(ClassImagesProgress(done, total))
            if world == 1:  # a stop asked meanwhile (a callback, should_stop) ends setup now, as Ctrl-C would
                stop.stop_during_setup()

        if main:
            if missing_indices(class_dir, cfg.num_class_images):
                place_denoiser()
            pipe = make_pipeline(c)
            with accelerator.autocast():
                made = generate_class_images(pipe, class_dir, cfg.class_prompt, cfg.num_class_images, cfg.seed, cfg.sample_batch_size,
                                             cfg.class_generation_steps, cfg.resolution, sampler=cfg.class_sampler,
                                             provenance=class_provenance(cfg), on_progress=class_progress)
            if made:  # a resume whose checkpoint had no record to check them against: record the images there now
                inputs = None
        accelerator.wait_for_everyone()  # generated once, on rank 0; the others read the files
    t_class = time.time() - t_class

    te_trained = cfg.train_text_encoder or cfg.trains_embeddings
    method.attach(fam, unet, text_encoders, cfg)
    # pivotal tuning / textual inversion: the identifier becomes new tokens, rewritten in every prompt (methods/embeddings.py)
    tokens = embeddings.attach(fam, c.tokenizers, text_encoders, cfg) if cfg.trains_embeddings else {}
    # frozen weights in the compute dtype; trained weights (and LoRA params) stay fp32 for the optimizer.
    # VAEs flagged force_upcast (SDXL's) overflow in fp16, and with cached latents fp32 costs nothing.
    vae.to(dtype=torch.float32 if getattr(vae.config, "force_upcast", False) and not cfg.pretrained_vae_model_name_or_path else weight_dtype)
    for m in (unet, *text_encoders):
        for p in m.parameters():
            if p.is_floating_point():  # not bitsandbytes' packed nf4 bytes
                p.data = p.data.float() if p.requires_grad else p.data.to(weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in text_encoders if te_trained else []:
            # transformers 5.x renamed it (the old name warns of its removal in v6); older 5.x releases have only the old
            getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)

    # --- data and caches ------------------------------------------------------------------------------------
    sets = {"instance": instance_set}
    if prior:
        sets["class"] = class_image_set(class_dir, cfg.num_class_images, cfg.class_prompt, cfg.resolution)
    cache = cfg.cache_latents and cfg.center_crop  # a random crop is a new image each step
    # enable_bucket: class images are cropped to the instance batch's bucket (one forward), cached at each bucket used
    buckets_used = sorted(set(instance_set.sizes)) if instance_set.sizes else None
    sources = {k: LatentSource(s, vae, cfg, cache, buckets_used if k == "class" else None) for k, s in sets.items()}
    vloss = validation_loss.build(cfg, fam, objective, sources, sets, lambda s: LatentSource(s, vae, cfg, True))
    # every prompt a step can use, once: per-image captions (else instance_prompt), class_prompt, "" for caption_dropout
    texts = list(dict.fromkeys([p for s in sets.values() for p in s.distinct_prompts()] + ([""] if cfg.caption_dropout else [])
                                + (vloss.prompts() if vloss else [])))
    ids = {p: fam.tokenize(c.tokenizers, embeddings.rewrite(p, tokens), device) for p in texts}
    text_cache = None
    if not te_trained:  # frozen text encoders: each distinct prompt encoded once
        with torch.no_grad():
            text_cache = {p: cond_to(fam.encode(text_encoders, v, cfg.resolution), weight_dtype) for p, v in ids.items()}
    # nothing needs these until validation (which brings them back for its render): free accelerator memory for the
    # denoiser. Frozen text encoders once their prompts are encoded (FLUX's and SD3's T5-XXL is ~9 GB in bf16).
    idle = ([vae] if cache and not te_trained else []) + ([] if te_trained else text_encoders)
    for m in idle:
        m.to("cpu")
    place_denoiser()

    # --- optimizer and schedule -------------------------------------------------------------------------------
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * world if cfg.scale_lr else 1
    groups = method.param_groups(unet, text_encoders, cfg, scale)
    optimizer = make_optimizer(cfg, groups, device)  # optimizer= (optimizers.py)
    lr_scheduler = make_schedule(cfg, optimizer)
    ema = EMA([p for g in groups for p in g["params"]], cfg.ema_decay, cfg.offload_ema) if cfg.use_ema else None
    trained = method.trained_modules(fam, unet, text_encoders, cfg)
    log.info("%s", run_summary(trained, groups, cfg, fam.denoiser_name))
    if offload and world > 1:  # DDP neither syncs nor broadcasts the offloaded frozen weights (it wants one device)
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(unet, offload.frozen_names(unet))
    # accelerate would move the whole model to the device; offload placed it already
    prepared = accelerator.prepare(*trained.values(), optimizer, **({"device_placement": [False] * (len(trained) + 1)} if offload else {}))
    wrapped, optimizer = dict(zip(trained, prepared[:-1])), prepared[-1]
    # FSDP swaps in sharded parameters (accelerate remaps the optimizer, not `groups`) and clips only a model's own list
    fsdp = accelerator.distributed_type == "FSDP"
    clipped = [p for m in wrapped.values() for p in m.parameters() if p.requires_grad] if fsdp else [p for g in groups for p in g["params"]]
    unet_fwd = wrapped.get("unet", unet)  # textual inversion trains no UNet weight: it is not wrapped
    unet_fwd = torch.compile(unet_fwd) if cfg.torch_compile else unet_fwd
    te_fwd = [wrapped.get(n, te) for n, te in zip(fam.text_encoder_names, text_encoders)]

    # --- randomness: one generator per purpose, all checkpointed (generators.py) ------------------------------
    gens = Generators.seeded(sets, cfg.seed, device)

    start_step, earlier = 0, {}
    if resume:
        state, rng = ckpt.load_checkpoint(resume, trained, optimizer, lr_scheduler)
        start_step = state["step"]
        earlier = state.get("elapsed", {})  # time to model up to the checkpoint (none in checkpoints before session 56)
        if ema:
            ema.load_checkpoint(resume, state["ema_updates"])
        gens.load(rng, state["samplers"])
        log.info("resumed from %s at step %d", resume, start_step)
        if keeper:  # the scores so far and keep_best's best step so far
            keeper.load(state.get("keep_best"), resume, start_step)
    def so_far(total: float, training: float) -> dict[str, float]:
        """Time to model so far: this process's seconds plus what the resumed checkpoint recorded up to its step
        (newcomer56: a resume counted its own part only); what a checkpoint keeps as `elapsed`."""
        return {"total_s": earlier.get("total_s", 0.0) + total, "class_images_s": earlier.get("class_images_s", 0.0) + t_class,
                "training_s": earlier.get("training_s", 0.0) + training}

    log_path = run_dir / "train_log.jsonl"
    if main:
        redo_after(run_dir, start_step)  # the log past the checkpoint goes: the resumed run redoes those steps

    validate = ValidationGrids(  # validate(step): that step's grid (and validation_scores), validation_grid.py
        cfg=cfg, components=c, unet=unet, text_encoders=text_encoders, idle=idle, tokens=tokens, te_trained=te_trained,
        device=device, accelerator=accelerator, optimizer=optimizer, stop=stop, emit=emit, main=main, run_dir=run_dir,
        log_path=log_path, scorer=scorer, keeper=keeper, trained=trained, tome_gen=gens.tome)

    def score(step: int) -> dict[str, float]:
        """{set: validation loss} of the current weights, logged; {} when not due (validation_loss.py)."""
        if not (main and vloss and (step in (0, cfg.max_train_steps) or step % cfg.validation_loss_steps == 0)):
            return {}
        with eval_weights(optimizer):
            scores = vloss(unet, text_encoders, lambda p: text_cache[p] if text_cache else fam.encode(text_encoders, ids[p], cfg.resolution),
                           device, weight_dtype, accelerator.autocast(), 2 * cfg.train_batch_size, cfg.seed + 6)  # a step's rows
        log.info("step %d validation loss %s", step, " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores

    draw = BatchDraw(cfg=cfg, sets=sets, sources=sources, gens=gens, family=fam, vae_config=vae.config, rank=rank,
                     device=device)  # draw(kind, n_global, size): a step's rows of one image set (latents.py)

    # --- stopping: at a step boundary, where a checkpoint is consistent (see stop.py) --------------------------
    if inputs is None:  # a new run: its class images exist only now
        inputs = input_record(cfg, run_dir) if main else {}
    saved_step, saved_path = start_step, resume  # the newest checkpoint of this run (the resumed one; 0: none)

    def save_checkpoint(done: int) -> None:
        nonlocal saved_step, saved_path
        saved_step, saved_path = done, ckpt.checkpoint_dir(run_dir, done)
        if main:
            now = time.time()
            extra = {"samplers": gens.sampler_positions(), "inputs": inputs, "elapsed": so_far(now - t_start, now - t0),
                     **({"ema_updates": ema.updates} if ema else {}), **({"keep_best": keeper.state()} if keeper else {})}
            files = {**({EMA_FILE: ema.state_dict()} if ema else {}), **(keeper.files() if keeper else {})}
            ckpt.save_checkpoint(run_dir, done, trained, optimizer, lr_scheduler, gens.rng_state(), extra, cfg.checkpoints_total_limit,
                                 files=files or None)
            log.info("%s saved", saved_path.name)
            emit(CheckpointSaved(done, saved_path))
        accelerator.wait_for_everyone()

    def stop_here(done: int) -> None:
        """Checkpoint `done` and raise TrainingInterrupted if any process was asked to stop."""
        wanted = stop.requested()
        if world > 1:  # every rank stops at the same step, or the others wait in a collective forever
            wanted = accelerator.reduce(torch.tensor(float(wanted), device=device), "max").item() > 0
        if not wanted:
            return
        bar.update(done - bar.n)  # iterating the bar counts a step when the next begins: show `done`, as the line below
        bar.close()
        if done > saved_step:
            save_checkpoint(done)
        what = f"{saved_path} holds step {done}" if done else "nothing trained yet, nothing to save"
        then = how_to_continue(cfg.resume_from_checkpoint, saved_now=saved_path != resume)
        raise TrainingInterrupted(f"{stop.source or 'stop request on another process'} at step {done}/{cfg.max_train_steps}: "
                                  f"{what}; {then}", stop.signum or 2,
                                  done, saved_path if done else None)

    # --- the loop ---------------------------------------------------------------------------------------------
    if cfg.tome_ratio:  # tomesd would otherwise fork the global RNG, invisibly to checkpoints
        unet._tome_info["args"]["generator"] = gens.tome
    unet_fwd.train()
    for te in te_fwd:
        te.train(te_trained)
    stop.setup = stop.raising = False  # from here on a signal stops at the next step boundary
    if start_step == 0:
        if scores := score(0):
            with log_path.open("a") as f:
                f.write(json.dumps({"step": 0, **validation_loss.log_keys(scores)}) + "\n")
            emit(ValidationLoss(0, scores["train"], scores.get("heldout")))
        validate(0)  # the "before" grid
    n_global = cfg.train_batch_size * world
    kinds = list(sets)
    bar = tqdm(range(start_step, cfg.max_train_steps), initial=start_step, total=cfg.max_train_steps, desc="train",
               disable=not main, unit="step")
    stop_here(start_step)  # asked during the "before" grid
    t0 = t_last = time.time()
    for step in bar:
        sums = {"loss": 0.0, "instance_loss": 0.0, "prior_loss": 0.0}
        for _ in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(*wrapped.values()):
                drawn = []
                for k in kinds:  # class rows take the instance batch's (w, h): its bucket (buckets.py)
                    drawn.append(draw(k, n_global, drawn[0][4] if drawn else None))
                latents = torch.cat([d[0] for d in drawn])
                # the whole global batch's noise and timesteps, drawn alike on every rank; this rank trains its rows
                noise_all, t_all = objective.sample((n_global * len(kinds), *latents.shape[1:]), gens.noise, cfg.noise_offset)
                rows = torch.cat([torch.arange(rank * cfg.train_batch_size, (rank + 1) * cfg.train_batch_size) + j * n_global
                                  for j in range(len(kinds))])
                noise, timesteps = noise_all[rows].to(device), t_all[rows].to(device)
                noisy = objective.noisy(latents, noise, timesteps)
                # one encoding per distinct prompt (cached when frozen), repeated over its runs of rows in the batch
                runs = [(p, len(list(g))) for p, g in itertools.groupby(p for d in drawn for p in d[2])]
                enc = {}
                for p, _ in runs:
                    if p not in enc:
                        enc[p] = text_cache[p] if text_cache else fam.encode(te_fwd, ids[p], cfg.resolution)
                cond = cond_to(cond_batch([enc[p] for p, _ in runs], [n for _, n in runs]), weight_dtype)
                # what each drawn image is (size, crop): rows in the order of latents
                cond = fam.micro_conditioning(cond, torch.cat([d[1] for d in drawn]), drawn[0][4][::-1] if cfg.enable_bucket else cfg.resolution)
                with accelerator.autocast():
                    pred = fam.denoise(unet_fwd, noisy.to(weight_dtype), timesteps, cond)
                target = objective.target(latents, noise, timesteps)
                loss, inst, prior_l = dreambooth_loss(pred, target, cfg.train_batch_size, cfg.prior_loss_weight,
                                                      objective.weights(timesteps, cfg.snr_gamma), drawn[0][3], cfg.unmasked_weight)
                # one host sync per micro-step, not four: on an accelerator each .item() stalls the queue of kernels
                prior_d = torch.full_like(loss, math.nan) if prior_l is None else prior_l.detach()
                loss_v, inst_v, prior_v = torch.stack([loss.detach(), inst.detach(), prior_d]).float().tolist()
                diverged = not math.isfinite(loss_v)
                if world > 1:  # "max" of the flag: accelerate.reduce knows sum/mean/max, and any rank's NaN poisons all
                    diverged = accelerator.reduce(torch.tensor(float(diverged), device=device), "max").item() > 0
                if diverged:
                    last = ckpt.list_checkpoints(run_dir)
                    raise TrainingError(f"loss is {loss_v} at step {step + 1}: training diverged; lower learning_rate "
                                        f"or use mixed_precision=bf16; last good checkpoint: {last[-1] if last else 'none'}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(clipped, cfg.max_grad_norm)
                if cfg.trains_embeddings:
                    embeddings.pivot(optimizer, step, cfg)  # the new rows stop after cfg.new_tokens_frac of the steps
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums["loss"] += loss_v / cfg.gradient_accumulation_steps
            sums["instance_loss"] += inst_v / cfg.gradient_accumulation_steps
            sums["prior_loss"] += prior_v / cfg.gradient_accumulation_steps
        lr_scheduler.step()
        if ema:
            ema.update()
        done = step + 1
        if world > 1:
            sums = {k: accelerator.reduce(torch.tensor(v, device=device), "mean").item() for k, v in sums.items()}
        if main:
            now = time.time()
            record = {"step": done, **{k: (None if math.isnan(v) else round(v, 6)) for k, v in sums.items()},
                      "lr": step_size(optimizer, lr_scheduler), "time": round(now - t0, 3)}
            scores = score(done)  # after the Step event's numbers are fixed, before its line is written
            with log_path.open("a") as f:
                f.write(json.dumps({**record, **validation_loss.log_keys(scores)}) + "\n")
            bar.set_postfix(loss=f"{sums['loss']:.4f}")
            emit(Step(done, cfg.max_train_steps, sums["loss"], sums["instance_loss"], sums["prior_loss"] if prior else None,
                      record["lr"], now - t_last))
            if scores:
                emit(ValidationLoss(done, scores["train"], scores.get("heldout")))
            t_last = now
            if done % cfg.log_every == 0 or done == cfg.max_train_steps:  # the last step's line too (12 steps: 10 and 12)
                log.info("step %d/%d loss %.4f (instance %.4f%s) lr %.2e", done, cfg.max_train_steps, sums["loss"], sums["instance_loss"],
                         "" if not prior else f", prior {sums['prior_loss']:.4f}", record["lr"])
        due = bool(cfg.validation_steps and done % cfg.validation_steps == 0 and done < cfg.max_train_steps)
        if due and keeper:  # scored before this step's checkpoint, which then holds its scores (and best weights) for a resume
            validate(done)
        if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
            save_checkpoint(done)
        if due and not keeper:
            validate(done)
        if done < cfg.max_train_steps:
            stop_here(done)
    bar.close()
    t_train = time.time() - t0

    # --- outputs: the weights first, then the optional final grid -------------------------------------------------
    accelerator.wait_for_everyone()
    final_weights(optimizer)  # schedule-free: the averaged weights are the result; the others: nothing
    if ema:
        ema.copy_to_params()  # the average is the result (and what the final grid shows)
    if cfg.keep_best and main:  # the last step is a candidate too: score it, then put the chosen step's weights in place
        validate(cfg.max_train_steps)
        keeper.keep(trained, cfg.max_train_steps)
    t_save = time.time()
    saved_unet, saved_tes = unet, text_encoders
    if fsdp:  # sharded weights: gathered whole (every process), saved from plain copies
        from .fsdp import unsharded

        plain = {n: unsharded(accelerator, m) for n, m in wrapped.items()}
        saved_unet = plain.get("unet", unet)
        saved_tes = [plain.get(n, te) for n, te in zip(fam.text_encoder_names, text_encoders)]
    if main:
        save_outputs(cfg, run_dir, c, saved_unet, saved_tes)
        log.info("weights saved in %s", run_dir)
    elapsed = so_far(time.time() - t_start, t_train)
    timing = TimeToModel.of(elapsed["total_s"], elapsed["class_images_s"], elapsed["training_s"], time.time() - t_save)
    if main:
        (run_dir / TIME_TO_MODEL).write_text(json.dumps(dataclasses.asdict(timing), indent=1) + "\n")
        log.info("%s", timing)
        if cfg.validation_prompts and cfg.tome_ratio:  # save_outputs removed ToMe; render as every other grid did
            apply_tome(unet, cfg.tome_ratio, fam.tome_max_downsample)
    if not cfg.keep_best:  # keep_best rendered it before the weights were chosen
        validate(cfg.max_train_steps, final=True)
    accelerator.end_training()  # no "done" line: the CLI's "run finished: DIR" says it (newcomer56 met both)
    emit(Done(run_dir, timing))
    return run_dir


def save_outputs(cfg: TrainConfig, run_dir: Path, c, unet, text_encoders: list) -> None:
    """Write the result under a temp folder, then move it into run_dir: no half-written outputs."""
    tmp = run_dir / ".tmp-output"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    apply_tome(unet, 0.0)  # save plain modules
    with ckpt.cleanup_on_error(tmp, "the trained weights"):
        METHODS[cfg.method]().save(tmp, c, unet, text_encoders, cfg)
    make_readable(tmp)  # safetensors writes 0600 files
    ckpt.publish(tmp, run_dir)
