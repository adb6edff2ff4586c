"""
The peers of bench_samplers.py: diffusers' schedulers in the configurations a pipeline would use for
each objective, driven as a pipeline drives them (init_noise_sigma, scale_model_input, its
timesteps), on the same model and noise as our samplers. diffusers is a test-only reference: the
benchmark prints our rows alone without it.
"""


def diffusers_configs(objective, schedule, prediction):
    """(row name, scheduler class, its kwargs): the configurations a pipeline would use for this
    objective (a row of bench_mixtures.OBJECTIVES)."""
    # what it switches to anyway, with a warning, when order does not divide NFE
    single = dict(lower_order_final=True)
    if objective == 'flow':
        flow = dict(use_flow_sigmas=True, prediction_type='flow_prediction', flow_shift=1.0)
        return [
            ('DPM++ 2M flow sigmas', 'DPMSolverMultistepScheduler', flow),
            ('DPM++ 3M flow sigmas', 'DPMSolverMultistepScheduler', dict(flow, solver_order=3)),
            (
                'DPM++ 3S flow sigmas',
                'DPMSolverSinglestepScheduler',
                dict(flow, solver_order=3, **single),
            ),
            ('UniPC bh2 flow sigmas', 'UniPCMultistepScheduler', flow),
            ('UniPC 3 flow sigmas', 'UniPCMultistepScheduler', dict(flow, solver_order=3)),
            ('FlowMatchEuler', 'FlowMatchEulerDiscreteScheduler', dict(shift=1.0)),
            ('FlowMatchHeun', 'FlowMatchHeunDiscreteScheduler', dict(shift=1.0)),
        ]
    vp = dict(
        beta_schedule={'linear': 'linear', 'cosine': 'squaredcos_cap_v2'}[schedule],
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type={'eps': 'epsilon', 'v': 'v_prediction'}[prediction],
    )
    configs = [
        ('DPM++ 2M (default)', 'DPMSolverMultistepScheduler', vp),
        ('DPM++ 2M karras', 'DPMSolverMultistepScheduler', dict(vp, use_karras_sigmas=True)),
        ('DPM++ 2M lu lambdas', 'DPMSolverMultistepScheduler', dict(vp, use_lu_lambdas=True)),
        ('DPM++ 2M trailing', 'DPMSolverMultistepScheduler', dict(vp, timestep_spacing='trailing')),
        ('DPM++ 3M', 'DPMSolverMultistepScheduler', dict(vp, solver_order=3)),
        (
            'DPM++ 3M karras',
            'DPMSolverMultistepScheduler',
            dict(vp, solver_order=3, use_karras_sigmas=True),
        ),
        (
            'DPM++ 3S (singlestep)',
            'DPMSolverSinglestepScheduler',
            dict(vp, solver_order=3, **single),
        ),
        ('UniPC bh2', 'UniPCMultistepScheduler', vp),
        ('UniPC 3', 'UniPCMultistepScheduler', dict(vp, solver_order=3)),
        ('UniPC bh2 karras', 'UniPCMultistepScheduler', dict(vp, use_karras_sigmas=True)),
        ('DDIM leading (default)', 'DDIMScheduler', dict(vp, clip_sample=False)),
        (
            'DDIM trailing',
            'DDIMScheduler',
            dict(vp, clip_sample=False, timestep_spacing='trailing'),
        ),
        ('Euler', 'EulerDiscreteScheduler', vp),
        ('Euler karras', 'EulerDiscreteScheduler', dict(vp, use_karras_sigmas=True)),
        ('Heun karras', 'HeunDiscreteScheduler', dict(vp, use_karras_sigmas=True)),
    ]
    # the clipping its docs call critical for squaredcos_cap_v2
    if schedule == 'cosine':
        clipped = dict(vp, lambda_min_clipped=-5.1)
        configs.insert(1, ('DPM++ 2M lambda_min -5.1', 'DPMSolverMultistepScheduler', clipped))
    return configs


def run_diffusers(net, x, diffusion, nfe, cls_name, kwargs, at_sigma=False):
    """As a pipeline does: x = noise * init_noise_sigma, the model called on scale_model_input(x) at
    the timestep the scheduler passes (flow: timestep / 1000 is our t), its output handed to step().
    at_sigma: the model at the noise level of the scheduler's own sigma instead, which its timestep
    only approximates. Returns (x, first t)."""
    import diffusers

    sched = getattr(diffusers, cls_name)(**kwargs)
    # Heun: 2 calls a step, 1 for the last
    sched.set_timesteps((nfe + 1) // 2 if 'Heun' in cls_name else nfe)
    assert len(sched.timesteps) <= nfe, (cls_name, nfe, len(sched.timesteps))
    flow = diffusion.objective == 'flow'
    # flow: sigma is t; vp: sigma / alpha (DDIM has none: t is exact)
    if at_sigma and hasattr(sched, 'sigmas'):
        s = sched.sigmas[: len(sched.timesteps)].double()
        ts = s if flow else diffusion.t_from_edm_sigma(s)
    else:
        ts = sched.timesteps.double() / 1000 if flow else sched.timesteps.double()
    # as the SDXL, Wan, PixArt pipelines do: then repeated timesteps work
    if hasattr(sched, 'set_begin_index'):
        sched.set_begin_index(0)
    # the flow-match schedulers have neither: x is x_1
    x = x * getattr(sched, 'init_noise_sigma', 1.0)
    scale = getattr(sched, 'scale_model_input', lambda x, t: x)
    for t, t_obj in zip(sched.timesteps, ts.tolist()):
        x = sched.step(net(scale(x, t), t_obj), t, x).prev_sample
    return x.double(), ts[0].item()
