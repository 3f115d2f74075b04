"""Every default of rflow_jax, once, each commented.

Family configs (quickstart.py, shapes.py, ...) start from `get_config()` here and override what differs. Library code
never supplies a default of its own: it reads these fields, and `rflow_jax.config_lib.validate` checks them before
any compilation.

Not a launchable config by itself; see configs/quickstart.py for the launch command.
"""

import ml_collections


def get_config():
  """Returns the base ConfigDict with every field rflow_jax reads."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Root seed: parameters, the data order and every per-step RNG are derived from it.
  # What is trained: a key of rflow_jax/train/tasks.py's TASKS: "flow" (the backbone on frozen text encoders with the
  # flow-matching loss) | "vae" (the autoencoder, section `vae` below).
  c.task = "flow"

  # --- Data -------------------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # rflow_jax/data/registry.py: "shapes" (procedural, built in) | "arrayrecord" (data.path) | "precomputed" (data.path:
  # VAE latent moments and text-encoder outputs of `python -m rflow_jax.precompute`, docs/data.md).
  c.data.name = "shapes"
  # Side S of what the backbone reads: pixels (shapes supports 32 and 64); with name="precomputed" the latent side
  # (the precompute config's own image_size, in pixels, divided by the VAE's downsampling factor).
  c.data.image_size = 32
  c.data.num_records = 1_000_000  # Size of the (procedural, deterministic) source; one epoch = this many examples.
  c.data.caption_style = "mixed"  # "mixed" = 50/50 sentence/tag captions (the paper's original/synthetic mix).
  c.data.worker_count = 0  # grain worker processes; 0 = produce batches in the training process.
  c.data.seed = 0  # Seed of the procedural records (which image record i is), independent of the shuffle seed.
  # With name="arrayrecord": the output directory of `python -m rflow_jax.data.convert` (docs/data.md); its images
  # are resized and centre-cropped to image_size. num_records, caption_style and seed apply to shapes only.
  c.data.path = ""
  # Aspect-ratio buckets (docs/data.md): ((height, width), ...) pixel sizes of about equal pixel count, each divisible
  # by model.patch_size. Each record trains at the bucket nearest its stored aspect ratio (resized to cover it,
  # centre-cropped); each step draws one bucket, weighted by its records. () = off: squares of image_size (which still
  # sets the sample grid's size). name="precomputed": the precompute config's buckets (its latents are h/f x w/f).
  c.data.buckets = ()

  # --- Precompute (`python -m rflow_jax.precompute`: a converted dataset -> VAE moments + text embeddings) ----------
  c.precompute = ml_collections.ConfigDict()
  c.precompute.latent_dtype = "float16"  # Storage dtype of the posterior mean and logvar: float32|float16|bfloat16.
  c.precompute.text_dtype = "float16"  # Storage dtype of the text encoders' outputs: float32|float16|bfloat16.
  # Images per device per encoder call. Every call has this shape (the last one padded), so a record's bytes never
  # depend on which process or batch encoded it.
  c.precompute.batch_size = 16

  # --- Text conditioning --------------------------------------------------------------------------------------
  # encoders="tiny": two tiny frozen, randomly initialised encoders stand in for CLIP and T5: "clip" gives
  # penultimate-layer tokens + a pooled EOS vector, "t5" gives final-layer tokens, composed like SD3's
  # (docs/conventions.md). encoders="sd3": SD3's CLIP-L, OpenCLIP bigG and T5 v1.1 (docs/text_encoders.md).
  c.text = ml_collections.ConfigDict()
  c.text.encoders = "tiny"  # "tiny" (the stand-ins; fields max_length..num_heads) | "sd3" (the real architectures).
  # encoders="sd3": a StableDiffusion3Pipeline directory whose text_encoder*/ and tokenizer*/ hold released weights;
  # "" = the same three architectures at tiny size (each CLIP text.width/depth/num_heads, T5 twice as wide) with
  # random weights from text.init_seed, frozen and stored in the run's checkpoints.
  c.text.sd3_path = ""
  c.text.t5_length = 256  # encoders="sd3": T5 tokens per prompt (diffusers' pipeline 256, the paper 77) after 77 CLIP.
  c.text.use_t5 = True  # encoders="sd3": False = T5 off (zeros in its tokens; not loaded), for small memory.
  c.text.dtype = "float32"  # encoders="sd3": compute dtype of the encoders ("bfloat16" on TPU/GPU); params float32.
  c.text.scan_layers = False  # encoders="sd3": nn.scan over each encoder's layers (compile time flat in depth).
  c.text.max_length = 16  # "tiny": tokens per encoder (BOS + words + EOS, padded); SD3 uses 77.
  c.text.width = 64  # Hidden width of each tiny encoder (also of the tiny "sd3" CLIP towers).
  c.text.depth = 2  # Transformer layers per tiny encoder.
  c.text.num_heads = 4  # Attention heads per tiny encoder.
  c.text.init_seed = 1234  # The frozen encoders' weights come from this seed (and are stored in checkpoints).
  c.text.drop_prob = 0.463  # Each encoder's output is dropped independently with this probability (paper §B.2).
  # What a dropped encoder gives: "zeros" | "empty" (the empty prompt's output of that encoder; precomputed records
  # store it once). The CFG negative of "tiny" follows it (zeros or the empty prompt); "sd3"'s is the empty prompt.
  c.text.drop_to = "zeros"

  # --- Model (MM-DiT; field names are rflow_jax.model.mmdit.MMDiT attributes) ---------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.arch = (
      "mmdit"  # "mmdit" | the paper's RQ2 baselines "dit", "crossdit", "uvit" (rflow_jax/model/baselines.py).
  )
  c.model.patch_size = 2  # p: p×p patches become tokens.
  c.model.in_channels = 3  # 3 for pixel space (quickstart), 16 for SD3 VAE latents.
  c.model.hidden_size = 128  # Width H (64·depth in the SD3 family).
  c.model.depth = 2  # Number of joint blocks.
  c.model.num_heads = 2  # Attention heads (head_dim = H / heads; 64 in SD3).
  c.model.mlp_ratio = 4.0  # MLP hidden = mlp_ratio·H.
  c.model.qk_norm = "rms_norm"  # None | "rms_norm": RMSNorm on q and k per head (paper §5.3.2, stabilises bf16).
  c.model.dual_attention_layers = ()  # Blocks with SD3.5's extra image-only self-attention (sd3.5-medium: 0..12).
  c.model.pos_embed_max_size = 16  # M: positional table is M×M patches, centre-cropped to the image's grid.
  c.model.dtype = "float32"  # Compute dtype ("bfloat16" on TPU/GPU); parameters are always stored in float32.
  # "einsum" (ours: two einsums) | "blocked" (ours: cache-sized groups, recomputing backward; faster at 1024 image
  # tokens, not at 256, docs/results/performance.md) | "xla" / "cudnn" / "auto" (jax.nn.dot_product_attention's
  # implementations) | a name given to layers.register_attention.
  c.model.attention_impl = "einsum"
  c.model.scan_blocks = False  # nn.scan over runs of identical blocks: compile time ~flat in depth (params stacked).
  # CPU: a fusion boundary on the residual gradient between unrolled blocks (layers.residual_grad_barrier says why).
  c.model.residual_grad_barrier = True
  c.model.remat = "none"  # Rematerialise each block: "none" | "full" | "dots" | ... (mmdit.REMAT_POLICIES).

  # --- VAE (task "vae"; field names follow rflow_jax.model.vae.AutoencoderKL; defaults are SD3's architecture) --
  c.vae = ml_collections.ConfigDict()
  # The trained VAE a flow run's latents come from: a diffusers AutoencoderKL directory (e.g. the --out of
  # `python -m rflow_jax.export.latent_stats`, which carries the shift/scale). precompute encodes with it; training on
  # data.name="precomputed" checks it is the one the records name and applies its shift/scale ("" = the manifest's).
  c.vae.path = ""
  c.vae.block_out_channels = (128, 256, 512, 512)  # Width per level; downsampling factor 2^(levels - 1).
  c.vae.layers_per_block = 2  # Res blocks per encoder level (the decoder has one more).
  c.vae.norm_num_groups = 32  # GroupNorm groups (divides every width).
  c.vae.latent_channels = 16  # Latent channels (SD3: 16); an MM-DiT on these latents has in_channels = this.
  c.vae.use_quant_conv = False  # 1x1 conv after the encoder (SD1/SDXL: on; SD3: off).
  c.vae.use_post_quant_conv = False  # 1x1 conv before the decoder (SD1/SDXL: on; SD3: off).
  c.vae.mid_block_attention = True  # Single-head self-attention in the mid blocks.
  c.vae.scaling_factor = 1.5305  # Latent normalisation z = (x - shift) * scale (SD3's; measure yours with
  c.vae.shift_factor = 0.0609  # `python -m rflow_jax.export.latent_stats`).
  c.vae.remat = False  # Rematerialise each res block in the backward pass (memory for compute at high resolution).
  c.vae.dtype = "float32"  # Compute dtype; parameters stay float32.
  c.vae.kl_weight = 1e-6  # KL weight (the KL is summed over latent elements and divided by the pixel count, as the
  # reconstruction term is a per-pixel mean: the ratio of the LDM autoencoders' summed losses).
  c.vae.perceptual = ""  # Name of a perceptual network registered with vae_task.register_perceptual ("" = none).
  c.vae.perceptual_weight = 0.0  # Weight of its distance (LPIPS-style; 0 = off).
  c.vae.disc_weight = 0.0  # PatchGAN hinge-loss weight (times the adaptive weight); 0 = no discriminator.
  c.vae.disc_start = 0  # Step from which the GAN loss and the discriminator's updates are on.
  c.vae.disc_channels = 64  # Width of the discriminator's first conv.
  c.vae.disc_layers = 3  # Stride-2 convs of the discriminator.
  c.vae.disc_learning_rate = 1e-4  # Discriminator peak learning rate (the rest of its AdamW is `optim`'s).
  c.vae.adaptive_weight_max = 1e4  # Clip of the adaptive GAN weight ‖∇L_rec‖/‖∇L_gan‖ at the last decoder layer.
  c.vae.decoder_only = False  # Freeze encoder and quant_conv (fine-tune the decoder; existing latents stay valid).
  c.vae.eval_per_kind = 20  # Held-out shapes scenes per kind for the "vae_recon" evaluator (3x this images).
  c.vae.eval_seed = 11  # Seed of those held-out scenes (a stream disjoint from the training records).
  c.vae.preview_examples = 8  # Originals/reconstructions in the periodic preview grid.

  # --- Flow ---------------------------------------------------------------------------------------------------
  c.flow = ml_collections.ConfigDict()
  c.flow.formulation = "rf/lognorm(0.00,1.00)"  # Paper name; see docs/formulations.md for all valid forms.
  c.flow.shift = 1.0  # Resolution-dependent timestep shift α used in training (3.0 at 1024² in SD3).

  # --- Optimiser ------------------------------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4  # Peak learning rate (paper: 1e-4).
  c.optim.warmup_steps = 1000  # Linear warmup from 0 (paper: 1000).
  # After warmup: "constant" | "cosine" (to 0 at train.num_steps) | "wsd" (warmup-stable-decay: constant, then linear
  # to 0 over the last optim.decay_fraction of train.num_steps; a decay branch is a run with fewer num_steps started
  # from a stable-phase checkpoint, see launch/sweep.py --branches).
  c.optim.decay = "constant"
  c.optim.decay_fraction = 0.2  # "wsd" only: the share of train.num_steps spent decaying (0 < f <= 1).
  c.optim.b1 = 0.9  # AdamW β1.
  c.optim.b2 = 0.999  # AdamW β2.
  c.optim.eps = 1e-8  # AdamW ε (paper uses 1e-15 with QK-norm for bf16 high-res finetunes).
  c.optim.weight_decay = 0.0  # Decoupled weight decay on matrices (not biases, norms or embeddings tables).
  c.optim.grad_clip_norm = 1.0  # Global-norm gradient clipping; 0 disables.
  # "optax" | "native": clip + AdamW + EMA in one C++ pass on a single CPU device (falls back to optax elsewhere,
  # with a warning; rflow_jax/train/native_update.py). ~4x faster than XLA:CPU's update at 74M params.
  c.optim.update_impl = "optax"
  c.optim.ema_decay = 0.9999  # EMA of parameters; effective decay is min(ema_decay, (1+step)/(10+step)).

  # --- Training loop ----------------------------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 64  # Examples per step across all processes.
  c.train.num_steps = 1000  # Total optimiser steps.
  # Gradient accumulation: each step's global batch is split into this many microbatches inside the jitted step
  # (forward + backward one at a time, float32 gradients summed, one update): activation memory / N, same recipe.
  # Must divide the batch of every process and of every data shard.
  c.train.microbatches = 1
  c.train.log_every = 50  # Fetch and write scalar metrics every N steps (metrics stay on device in between).
  c.train.checkpoint_every = 500  # Save state + data-iterator state every N steps (and always at the end).
  c.train.keep_checkpoints = 2  # Keep the newest N checkpoints.
  # Warm start: a training workdir whose newest checkpoint gives this run's initial params, EMA params and text
  # encoders (same model shapes); step, optimizer state and data order start fresh. Used only when WORKDIR has no
  # checkpoint of its own (a restarted warm-started run resumes itself). "" = random init. "pipeline:D" fine-tunes a
  # StableDiffusion3Pipeline directory D: its transformer's weights (params and EMA), with text.sd3_path and vae.path
  # set to D when empty; the model fields must be D's transformer's (rflow_jax/train/finetune.py, docs/export.md).
  c.train.init_from = ""
  # With init_from: the source may have fewer joint blocks. Its blocks are spread over this model's depth and the
  # added ones start as identity (adaLN-zero gates 0), so step 0 computes exactly the source's function (needs
  # model.scan_blocks=False in both runs; mmdit_tree.grown_block_positions says which block goes where).
  c.train.init_grow_depth = False
  c.train.sample_every = 0  # Write a sample grid (TensorBoard + PNG) every N steps; 0 = only at the end.
  # The grid after the last step; False skips it and its sampler compile (many short runs that need no grid).
  c.train.preview_at_end = True
  c.train.nonfinite = "halt"  # Loss/grad norm not finite: "halt" stops the run, "skip" drops the update and goes on.
  # Evaluators (keys of rflow_jax/eval/evaluators.py's EVALUATORS) run at eval_every and at the end; their scores go
  # to TensorBoard and metrics.jsonl as "<name>/<score>". "shapes" = ShapesEval of fresh prompts (the shapes data);
  # "val_loss" = held-out loss at 8 fixed t levels, raw and EMA weights (rflow_jax/eval/val_loss.py).
  c.train.evaluators = ("shapes",)
  c.train.eval_at_end = True  # Run the evaluators after the last step (into WORKDIR/eval/).
  # Also every N steps (0 = off), into WORKDIR/eval_step{N}/ and metrics.jsonl: quality against training time.
  c.train.eval_every = 0
  # Fault injection (rflow_jax/train/hooks.py): feed a batch of NaN images at this step (tests the guard); -1 = off.
  c.train.poison_step = -1
  # Fault injection (hooks.py): process train.signal_process sends itself SIGTERM as it draws the batch of step
  # train.signal_step, then pauses 2 s (a preemption notice reaching one host only); -1 = off.
  c.train.signal_step = -1
  c.train.signal_process = 0
  # Peak dense bf16 TFLOP/s of one device, for the MFU logged with the step rate (0 = do not log MFU). E.g. TPU v5p
  # 459, v6e 918, v5e 197, H100 SXM 989 (dense, no sparsity). Achieved TFLOP/s come from rflow_jax/utils/flops.py.
  c.train.peak_tflops_per_device = 0.0
  # Debug only (rflow_jax/train/hooks.py): each process keeps the data `index` of every example it trained on in
  # WORKDIR/seen_indices_p{process_index}.json (tests check the sharding: no duplicates, no gaps).
  c.train.record_seen_indices = False
  # Trace steps N..M (1-based, inclusive) with jax.profiler into WORKDIR/profile (TensorBoard's profile plugin or
  # Perfetto read it; docs/scaling.md). () = off. Other steps run untouched.
  c.train.profile_steps = ()

  # --- Sampling (periodic grids, the end-of-training eval and `python -m rflow_jax.sample`) ------------------------
  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 25  # ODE steps.
  c.sample.cfg_scale = 3.0  # Classifier-free guidance scale g (v = v_u + g·(v_c − v_u)); 1 = no guidance.
  c.sample.shift = 1.0  # Timestep shift α of the sampling schedule.
  c.sample.solver = "euler"  # "euler" | "heun" | "dpmpp_2m" (ODE) | "euler_stochastic" (rflow_jax/sampling/solvers.py).
  c.sample.schedule = "shifted_linear"  # "shifted_linear" | "diffusers" (FlowMatchEulerDiscreteScheduler's grid).
  c.sample.use_ema = True  # Sample with EMA parameters.
  c.sample.batch_size = 40  # Prompts per jitted sampling call.
  c.sample.eval_per_kind = 40  # ShapesEval prompts per scene kind (single, position, counting).
  c.sample.eval_seed = 7  # Seed of the fresh ShapesEval prompts and their noise.
  c.sample.grid_prompts = (  # Fixed prompts of the periodic sample grid.
      "a red circle",
      "a blue square",
      "a green triangle",
      "a yellow circle",
      "a magenta square to the left of a cyan circle",
      "a red triangle above a blue circle",
      "two green squares",
      "three yellow circles",
  )

  # --- Evaluation: the validation-loss protocol (rflow_jax/eval/val_loss.py) ------------------------------------------
  c.eval = ml_collections.ConfigDict()
  # Held-out examples: records data.num_records … data.num_records + N - 1 of the data source, which the training
  # stream (indices below data.num_records) never reads. Must be a multiple of eval.val_loss_batch_size.
  c.eval.val_loss_examples = 256
  c.eval.val_loss_batch_size = 64  # Examples per jitted call (all 8 t levels each); a multiple of the batch ways.
  c.eval.val_loss_seed = 2024  # Seed of the fixed per-example noise (independent of config.seed, the same each run).

  # --- Sharding ---------------------------------------------------------------------------------------------------
  c.sharding = ml_collections.ConfigDict()
  # Sizes of the mesh axes (data, fsdp, tensor) within one slice (ICI); one -1 takes the rest of the slice.
  c.sharding.mesh_shape = (-1, 1, 1)
  c.sharding.rules = "fsdp"  # Logical-axis rule preset: "dp" | "fsdp" | "fsdp_tp" (rflow_jax/sharding/rules.py).
  # Slices stacked along each mesh axis over the data-centre network (DCN); the mesh is mesh_shape × dcn_mesh_shape.
  # A slice is a TPU slice, or one process where devices have no slice index (GPU hosts). E.g. 4 v5p slices
  # doing data parallelism between them: (4, 1, 1). All 1 = one slice (one -1 takes the number of slices).
  c.sharding.dcn_mesh_shape = (1, 1, 1)
  # (logical axis, mesh axes) pairs replacing the preset's entries, e.g. (("mlp", "fsdp"),); checked at startup.
  c.sharding.rule_overrides = ()

  # --- Checkpointing -------------------------------------------------------------------------------------------------
  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.async_save = True  # Write checkpoints in a background thread while training continues.
  return c
