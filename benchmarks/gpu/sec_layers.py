"""Benchmark sections ``linear`` and ``conv``: the expanded layer under each backend (and their
variants) against the masked, cat and fine-tuning peers, fwd+bwd and fwd."""
from __future__ import annotations

from gpu_measure import (_expanse_host_profiles, _host_profiles, _measure_after_torch,
                         _measure_auto_y_transposed, _measure_backends,
                         _measure_triton_conv_without_tma, _measure_triton_nchw_direct,
                         _measure_triton_without_tma, _reference)


# ---- (b) expanded linear -----------------------------------------------------------------
def sec_linear(ctx):
    torch = ctx.torch
    from torch import nn
    import expanse_fast as xf
    n_rows, i0, new = (64, 48, 12) if ctx.quick else (16384, 4096, 1024)
    dt, dev = ctx.dtype, ctx.dev
    width = i0 + new
    base = nn.Linear(i0, i0, device=dev, dtype=dt)
    layer = xf.ExpandedLinear.from_linear(base, new, new)
    layer.skip_old_input_grad = True  # as inside a model built by xf.expand()
    lay = layer.layout
    f_fwd = 2 * n_rows * lay.forward_macs()
    f_fb = f_fwd + 2 * n_rows * lay.backward_macs(need_input_grad=True, need_old_input_grad=False)
    ctx.res["config"] = dict(rows=n_rows, in_groups=lay.in_groups, out_groups=lay.out_groups,
                             dtype=str(dt), skip_old_input_grad=True,
                             useful_gflop_fwd=f_fwd / 1e9, useful_gflop_fwdbwd=f_fb / 1e9)
    k = ctx.n_sets(2 * n_rows * width * dt.itemsize)
    xs = [torch.randn(n_rows, width, device=dev, dtype=dt).requires_grad_() for _ in range(k)]
    dys = [torch.randn(n_rows, width, device=dev, dtype=dt) for _ in range(k)]
    params = [layer.weight_new, layer.bias_new]

    def exp_fb(i):
        y = layer(xs[i])
        return torch.autograd.grad(y, [xs[i]] + params, dys[i])

    def exp_f(i):
        with torch.no_grad():
            return layer(xs[i])

    # The torch backend first, then the peers (cuBLAS, quick), then the compiled backends,
    # whose first calls (compiling, autotuning) may use up the section's time.
    ref = _reference(ctx, exp_f, exp_fb, "linear")
    backends = ctx.usable_backends("linear")
    _measure_backends(ctx, backends[:1], exp_f, exp_fb, k, "fwd", "fwd+bwd", f_fwd, f_fb, ref)

    masked_fb = _linear_peer_masked(ctx, layer, xs, dys, k, f_fwd, f_fb)
    _linear_peer_cat(ctx, xs, dys, i0, new, k, f_fwd, f_fb)
    _linear_peer_finetune(ctx, xs, dys, i0, k, f_fwd, f_fb)
    _measure_after_torch(ctx, backends, exp_f, exp_fb, k, "fwd", "fwd+bwd", f_fwd, f_fb, ref,
                         triton_variant=_measure_triton_without_tma, mixed=True, swizzle=True)
    # last, after every timed row: where the host's time for one call goes
    _expanse_host_profiles(ctx, backends, "fwd+bwd", exp_fb)
    _host_profiles(ctx, "fwd+bwd", [("peer/masked", lambda: masked_fb(0))])


# Each peer lives in a function of its own: its modules and inputs go when it returns.
def _linear_peer_masked(ctx, layer, xs, dys, k, f_fwd, f_fb):
    """(i) A full-width dense Linear holding the staircase weights, frozen rows' grads masked.
    Returns its fwd+bwd call of set i, which the host profile at the section's end times."""
    torch = ctx.torch
    from torch import nn
    n_rows, width = xs[0].shape
    masked = nn.Linear(width, width, device=ctx.dev, dtype=ctx.dtype)
    with torch.no_grad():
        masked.weight.copy_(layer.dense_weight())
        masked.bias.copy_(layer.dense_bias())
    row_mask = torch.zeros(width, device=ctx.dev, dtype=ctx.dtype)
    row_mask[layer.layout.frozen_out:] = 1
    masked.weight.register_hook(lambda g: g * row_mask[:, None])
    masked.bias.register_hook(lambda g: g * row_mask)
    mparams = [masked.weight, masked.bias]

    def masked_fb(i):
        return torch.autograd.grad(masked(xs[i]), [xs[i]] + mparams, dys[i])

    def masked_f(i):
        with torch.no_grad():
            return masked(xs[i])

    mac = width * width
    ctx.measure("fwd+bwd", "peer/masked", "peer", [lambda i=i: masked_fb(i) for i in range(k)],
                f_fb, 3 * 2 * n_rows * mac)
    ctx.measure("fwd", "peer/masked", "peer", [lambda i=i: masked_f(i) for i in range(k)],
                f_fwd, 2 * n_rows * mac)
    return masked_fb


def _linear_peer_cat(ctx, xs, dys, i0, new, k, f_fwd, f_fb):
    """(ii) Progressive-Nets style: a frozen old module (no grad) and a new module, joined by
    torch.cat."""
    torch = ctx.torch
    from torch import nn
    n_rows, width = xs[0].shape
    old = nn.Linear(i0, i0, device=ctx.dev, dtype=ctx.dtype).requires_grad_(False)
    newm = nn.Linear(width, new, device=ctx.dev, dtype=ctx.dtype)
    nparams = list(newm.parameters())

    def cat_fwd(x):
        with torch.no_grad():
            y0 = old(x[:, :i0])
        return torch.cat([y0, newm(x)], dim=1)

    def cat_fb(i):
        return torch.autograd.grad(cat_fwd(xs[i]), [xs[i]] + nparams, dys[i])

    def cat_f(i):
        with torch.no_grad():
            return cat_fwd(xs[i])

    cat_fwd_macs = i0 * i0 + new * width
    ctx.measure("fwd+bwd", "peer/cat", "peer", [lambda i=i: cat_fb(i) for i in range(k)],
                f_fb, 2 * n_rows * (cat_fwd_macs + 2 * new * width))
    ctx.measure("fwd", "peer/cat", "peer", [lambda i=i: cat_f(i) for i in range(k)],
                f_fwd, 2 * n_rows * cat_fwd_macs)


def _linear_peer_finetune(ctx, xs, dys, i0, k, f_fwd, f_fb):
    """(iii) Fine-tuning the original, un-widened layer (its dx too)."""
    torch = ctx.torch
    from torch import nn
    n_rows = xs[0].shape[0]
    ft = nn.Linear(i0, i0, device=ctx.dev, dtype=ctx.dtype)
    fparams = list(ft.parameters())
    x0s = [x.detach()[:, :i0].contiguous().requires_grad_() for x in xs]
    dy0s = [d[:, :i0].contiguous() for d in dys]

    def ft_fb(i):
        return torch.autograd.grad(ft(x0s[i]), [x0s[i]] + fparams, dy0s[i])

    def ft_f(i):
        with torch.no_grad():
            return ft(x0s[i])

    ctx.measure("fwd+bwd", "peer/finetune", "peer", [lambda i=i: ft_fb(i) for i in range(k)],
                f_fb, 3 * 2 * n_rows * i0 * i0)
    ctx.measure("fwd", "peer/finetune", "peer", [lambda i=i: ft_f(i) for i in range(k)],
                f_fwd, 2 * n_rows * i0 * i0)


# ---- (c) expanded conv2d -----------------------------------------------------------------
def sec_conv(ctx):
    torch = ctx.torch
    from torch import nn
    import expanse_fast as xf
    batch, hw, c0, new = (2, 8, 16, 4) if ctx.quick else (64, 56, 256, 64)
    dt, dev = ctx.dtype, ctx.dev
    width = c0 + new
    base = nn.Conv2d(c0, c0, 3, padding=1, device=dev, dtype=dt)
    pix = batch * hw * hw * 9  # output pixels times kernel area
    layer0 = xf.ExpandedConv2d.from_conv(base, new, new)
    lay = layer0.layout
    f_fwd = 2 * pix * lay.forward_macs()
    f_fb = f_fwd + 2 * pix * lay.backward_macs(need_input_grad=True, need_old_input_grad=False)
    ctx.res["config"] = dict(batch=batch, hw=hw, kernel=3, in_groups=lay.in_groups,
                             out_groups=lay.out_groups, dtype=str(dt),
                             skip_old_input_grad=True, useful_gflop_fwd=f_fwd / 1e9,
                             useful_gflop_fwdbwd=f_fb / 1e9)
    k = ctx.n_sets(2 * batch * width * hw * hw * dt.itemsize)
    backends = ctx.usable_backends("conv2d")
    for fmt_name, fmt in (("channels_last", torch.channels_last),
                          ("nchw", torch.contiguous_format)):
        if ctx.left() < 8:
            ctx.note(f"conv {fmt_name}: skipped, out of time")
            continue
        v_fb, v_f = f"{fmt_name} fwd+bwd", f"{fmt_name} fwd"

        layer = xf.ExpandedConv2d.from_conv(base, new, new).to(memory_format=fmt)
        layer.skip_old_input_grad = True
        with torch.no_grad():
            layer.weight_new.copy_(layer0.weight_new)
        xs = [torch.randn(batch, width, hw, hw, device=dev, dtype=dt)
              .contiguous(memory_format=fmt).requires_grad_() for _ in range(k)]
        dys = [torch.randn(batch, width, hw, hw, device=dev, dtype=dt)
               .contiguous(memory_format=fmt) for _ in range(k)]
        params = [layer.weight_new, layer.bias_new]

        def exp_fb(i, layer=layer, xs=xs, dys=dys, params=params):
            return torch.autograd.grad(layer(xs[i]), [xs[i]] + params, dys[i])

        def exp_f(i, layer=layer, xs=xs):
            with torch.no_grad():
                return layer(xs[i])

        ref = _reference(ctx, exp_f, exp_fb, fmt_name)
        _measure_backends(ctx, backends[:1], exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref)

        same = dict(ctx=ctx, fmt=fmt, xs=xs, dys=dys, pix=pix, k=k, v_f=v_f, v_fb=v_fb,
                    f_fwd=f_fwd, f_fb=f_fb)
        masked_fb = _conv_peer_masked(layer=layer, **same)
        _conv_peer_cat(c0=c0, new=new, **same)
        _conv_peer_finetune(c0=c0, **same)
        _measure_after_torch(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref,
                             triton_variant=(_measure_triton_nchw_direct
                                             if fmt_name == "nchw"
                                             else _measure_triton_conv_without_tma),
                             dx_split=True, auto_variant=(_measure_auto_y_transposed
                                                          if fmt_name == "nchw" else None),
                             conv=True)
        # last, after every timed row: where the host's time for one call goes
        _expanse_host_profiles(ctx, backends, v_fb, exp_fb)
        _host_profiles(ctx, v_fb, [("peer/masked", masked_fb)])
        del ref, layer, xs, dys, masked_fb
        if ctx.cuda:
            torch.cuda.empty_cache()


def _conv(nn, c_in, c_out, fmt, ctx):
    """A 3x3 'same' conv of the section's device, dtype and memory format."""
    return nn.Conv2d(c_in, c_out, 3, padding=1, device=ctx.dev, dtype=ctx.dtype).to(
        memory_format=fmt)


def _conv_peer_masked(ctx, fmt, layer, xs, dys, pix, k, v_f, v_fb, f_fwd, f_fb):
    """(i) The masked full-width conv (cuDNN), frozen output channels' grads zeroed.  Returns
    its fwd+bwd call on set 0, which the host profile at the section's end times."""
    torch = ctx.torch
    from torch import nn
    width = xs[0].shape[1]
    masked = _conv(nn, width, width, fmt, ctx)
    with torch.no_grad():
        masked.weight.copy_(layer.dense_weight())
        masked.bias.copy_(layer.dense_bias())
    mask = torch.zeros(width, device=ctx.dev, dtype=ctx.dtype)
    mask[layer.layout.frozen_out:] = 1
    masked.weight.register_hook(lambda g: g * mask[:, None, None, None])
    masked.bias.register_hook(lambda g: g * mask)
    mp = [masked.weight, masked.bias]
    mac = width * width
    ctx.measure(v_fb, "peer/masked", "peer",
                [lambda i=i: torch.autograd.grad(masked(xs[i]), [xs[i]] + mp, dys[i])
                 for i in range(k)], f_fb, 3 * 2 * pix * mac)
    with torch.no_grad():
        ctx.measure(v_f, "peer/masked", "peer", [lambda i=i: masked(xs[i]) for i in range(k)],
                    f_fwd, 2 * pix * mac)

    def masked_fb():
        return torch.autograd.grad(masked(xs[0]), [xs[0]] + mp, dys[0])
    return masked_fb


def _conv_peer_cat(ctx, fmt, xs, dys, c0, new, pix, k, v_f, v_fb, f_fwd, f_fb):
    """(ii) Split convolutions joined with torch.cat."""
    torch = ctx.torch
    from torch import nn
    width = c0 + new
    old = _conv(nn, c0, c0, fmt, ctx).requires_grad_(False)
    newc = _conv(nn, width, new, fmt, ctx)
    npar = list(newc.parameters())

    def cat_fwd(x):
        with torch.no_grad():
            y0 = old(x[:, :c0])
        return torch.cat([y0, newc(x)], dim=1)

    cat_macs = c0 * c0 + new * width
    ctx.measure(v_fb, "peer/cat", "peer",
                [lambda i=i: torch.autograd.grad(cat_fwd(xs[i]), [xs[i]] + npar, dys[i])
                 for i in range(k)], f_fb, 2 * pix * (cat_macs + 2 * new * width))
    with torch.no_grad():
        ctx.measure(v_f, "peer/cat", "peer", [lambda i=i: cat_fwd(xs[i]) for i in range(k)],
                    f_fwd, 2 * pix * cat_macs)


def _conv_peer_finetune(ctx, fmt, xs, dys, c0, pix, k, v_f, v_fb, f_fwd, f_fb):
    """(iii) Fine-tuning the original conv (its dx too)."""
    torch = ctx.torch
    from torch import nn
    ft = _conv(nn, c0, c0, fmt, ctx)
    fpar = list(ft.parameters())
    x0s = [x.detach()[:, :c0].contiguous(memory_format=fmt).requires_grad_() for x in xs]
    dy0s = [d[:, :c0].contiguous(memory_format=fmt) for d in dys]
    ctx.measure(v_fb, "peer/finetune", "peer",
                [lambda i=i: torch.autograd.grad(ft(x0s[i]), [x0s[i]] + fpar, dy0s[i])
                 for i in range(k)], f_fb, 3 * 2 * pix * c0 * c0)
    with torch.no_grad():
        ctx.measure(v_f, "peer/finetune", "peer", [lambda i=i: ft(x0s[i]) for i in range(k)],
                    f_fwd, 2 * pix * c0 * c0)
