"""Peak memory of a FunMatch distillation step, from XLA's memory analysis.

ViT-B/8 teacher (224px, forward only) + FlexiViT-B student at a given patch size
(240px), Adam. Nothing is allocated: params are `jax.eval_shape`d and the step is
only compiled. Used by `benchmarks/perf.py --sections memory`.
"""
import jax
import jax.numpy as jnp
import optax

from flexi import vit

RES = 240


def _distill_step(teacher, student, tx, patch):
  def step(t_params, s_params, opt_state, t_images, s_images):
    t_logits, _ = teacher.apply({"params": t_params}, t_images)
    t_logits = jax.lax.stop_gradient(t_logits)

    def loss_fn(p):
      s_logits, _ = student.apply({"params": p}, s_images, patch_size=patch, train=True)
      kl = jax.nn.softmax(t_logits) * (jax.nn.log_softmax(t_logits)
                                       - jax.nn.log_softmax(s_logits))
      return kl.sum(-1).mean()
    loss, grads = jax.value_and_grad(loss_fn)(s_params)
    updates, opt_state = tx.update(grads, opt_state, s_params)
    return optax.apply_updates(s_params, updates), opt_state, loss
  return step


def peak_bytes(compiled):
  """Arguments + outputs + temporaries - aliased buffers, from XLA's memory analysis."""
  mem = compiled.memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)


def distill_memory(batch, patch, teacher="B/8", student="B", **student_kw):
  """Peak/temp/argument bytes of one compiled distillation step."""
  teacher = vit.Model(1000, variant=teacher, posemb_size=28, pool_type="tok")
  student = vit.Model(1000, variant=student, pool_type="tok", **student_kw)
  tx = optax.adam(1e-3)
  rng = jax.random.PRNGKey(0)
  t_params = jax.eval_shape(teacher.init, rng, jnp.zeros((1, 224, 224, 3)))["params"]
  s_params = jax.eval_shape(student.init, rng, jnp.zeros((1, RES, RES, 3)))["params"]
  opt_state = jax.eval_shape(tx.init, s_params)
  step = jax.jit(_distill_step(teacher, student, tx, (patch, patch)), donate_argnums=(1, 2))
  compiled = step.lower(t_params, s_params, opt_state,
                        jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32),
                        jax.ShapeDtypeStruct((batch, RES, RES, 3), jnp.float32)).compile()
  mem = compiled.memory_analysis()
  return dict(peak_bytes=peak_bytes(compiled), temp_bytes=mem.temp_size_in_bytes,
              argument_bytes=mem.argument_size_in_bytes)


def lit_locked_tower(batch, patch, *, skip_frozen_grads=True):
  """The flexi-LiT step of configs/flexilit_b.py (B image tower locked, B text tower),
  as the training loop builds it, with or without leaving the locked tower out of the
  differentiation (flexi.steps.make_train_step's `frozen`). Returns the bytes of
  gradients the gradient program hands to the update program and each program's peak
  (XLA's memory analysis; params are initialised, nothing runs)."""
  import os  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel

  from flexi import config as config_lib, optim, sharding, steps  # pylint: disable=import-outside-toplevel
  from trainers import lit  # pylint: disable=import-outside-toplevel

  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load(os.path.join(here, "configs", "flexilit_b.py"), schema=lit.schema())
  trainer = lit.make_trainer(config)
  mesh = sharding.make_mesh([("data", -1)])
  rep = sharding.replicated(mesh)
  spec = {"image": jax.ShapeDtypeStruct((batch, RES, RES, 3), jnp.float32, sharding=rep),
          lit.TEXT_KEY: jax.ShapeDtypeStruct((batch, 16), jnp.int32, sharding=rep)}
  params = jax.eval_shape(trainer.init_params, jax.random.PRNGKey(0), spec)
  tx, lr_fn = optim.make_optimizer(config, params, total_steps=100, warmup_steps=10,
                                   frozen=trainer.frozen)
  opt_state = jax.eval_shape(tx.init, params)
  frozen = optim.frozen_mask(config, params, trainer.frozen) if skip_frozen_grads else None
  build = steps.make_train_step(trainer, tx, lr_fn, seed=0, frozen=frozen)
  p_sh, o_sh = (jax.tree.map(lambda _: rep, t) for t in (params, opt_state))
  sampler = types.SimpleNamespace(values=[patch], kwargs=lambda p: {"patch_size": (p, p)})
  step = steps.compile_all(build, sampler, params, opt_state, None, spec, mesh, p_sh,
                           o_sh)[0][patch]
  out = {"grads_bytes": sum(x.size * x.dtype.itemsize
                            for x in jax.tree.leaves(build.grads_like(params)))}
  for name, program in (("grad", step.grads), ("update", step.update)):
    out[f"{name}_peak_bytes"] = peak_bytes(program)
  return out
