"""Bad input gets a clear error, never a silently wrong Gramian, and leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import flat_gramian
from torch import nn
from torch.func import functional_call
from torch.overrides import _get_current_function_mode_stack

import torchgram

D = torch.float64
W = {"w": torch.randn(4, 3, dtype=D)}
X = torch.randn(5, 4, dtype=torch.float64)


def losses(params, x):
    return (x @ params["w"]).pow(2).sum(-1)


def test_fn_returning_a_non_tensor() -> None:
    with pytest.raises(TypeError, match="fn must return a tensor.*returned a list"):
        torchgram.gramian(lambda p, x: [losses(p, x)], W, X, batch_dim=0)


def test_fn_returning_a_pair_without_has_aux() -> None:
    with pytest.raises(TypeError, match="set has_aux=True"):
        torchgram.gramian(lambda p, x: (losses(p, x), 1), W, X)


def test_has_aux_without_a_pair() -> None:
    with pytest.raises(TypeError, match="has_aux=True but fn returned a Tensor, not a pair"):
        torchgram.gramian(losses, W, X, batch_dim=0, has_aux=True)


def test_integer_output() -> None:
    with pytest.raises(TypeError, match="must be floating-point"):
        torchgram.gramian(lambda p, x: losses(p, x).long(), W, X)


@pytest.mark.parametrize("batch_dim", [1, -2])
def test_batch_dim_out_of_range(batch_dim) -> None:
    with pytest.raises(ValueError, match=f"batch_dim={batch_dim} is out of range"):
        torchgram.gramian(losses, W, X, batch_dim=batch_dim)


def test_batch_dim_not_the_sample_dimension() -> None:
    def fn(params, x):
        return (x @ params["w"]).T  # [3, B]: samples on dim 1

    with pytest.raises(ValueError, match="with size 3 at batch_dim=0"):
        torchgram.gramian(fn, W, X, batch_dim=0)


def test_batch_dim_with_data_in_a_closure() -> None:
    with pytest.raises(ValueError, match="pass the data as an argument"):
        torchgram.gramian(lambda p: losses(p, X), W, batch_dim=0)


def test_batch_dim_with_no_batched_argument() -> None:
    with pytest.raises(ValueError, match="no argument of fn holds samples"):
        torchgram.gramian(losses, W, X, batch_dim=0, in_dims=(None, None))


def test_in_dims_of_different_sizes() -> None:
    def fn(params, x, y):
        return losses(params, x) + y.sum(-1)

    with pytest.raises(ValueError, match="dimensions of different sizes.*5 at dim 0.*2 at dim 1"):
        torchgram.gramian(fn, W, X, torch.randn(5, 2), batch_dim=0, in_dims=(None, 0, 1))


def test_in_dims_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="in_dims has 3 entries but fn was called with 2"):
        torchgram.gramian(losses, W, X, batch_dim=0, in_dims=(None, 0, 0))


def test_in_dims_out_of_range() -> None:
    with pytest.raises(ValueError, match="at dim 2, but that tensor has shape"):
        torchgram.gramian(losses, W, X, batch_dim=0, in_dims=(None, 2))


def test_empty_params() -> None:
    with pytest.raises(ValueError, match="params has no leaves"):
        torchgram.gramian(lambda p, x: x.sum(-1), {}, X, batch_dim=0)


def test_non_tensor_leaf_in_params() -> None:
    with pytest.raises(TypeError, match=r"leaf at \('scale',\) is a float"):
        torchgram.gramian(losses, {"w": W["w"], "scale": 2.0}, X, batch_dim=0)


def test_integer_leaf_in_params() -> None:
    with pytest.raises(TypeError, match="dtype torch.int64"):
        torchgram.gramian(losses, {"w": W["w"], "steps": torch.tensor(3)}, X, batch_dim=0)


def test_bad_option_types() -> None:
    with pytest.raises(TypeError, match="batch_dim must be an int"):
        torchgram.gramian_of(losses, batch_dim="0")
    with pytest.raises(TypeError, match="argnums must be an int"):
        torchgram.gramian_of(losses, argnums="0")
    with pytest.raises(TypeError, match="fn must be callable"):
        torchgram.gramian_of(3)


def _batchnorm_fn(track_running_stats=True):
    norm = nn.BatchNorm1d(3, track_running_stats=track_running_stats)
    model = nn.Sequential(nn.Linear(4, 3), norm).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(params, x):
        return functional_call(model, params, (x,)).pow(2).sum(-1)

    return model, params, fn


def test_batchnorm_in_training_mode_is_refused() -> None:
    _, params, fn = _batchnorm_fn(track_running_stats=False)
    with pytest.raises(ValueError, match=r"batch_norm in training mode.*model\.eval\(\)"):
        torchgram.gramian(fn, params, X, batch_dim=0)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_running_statistics_update_is_refused_before_it_happens(batch_dim) -> None:
    model, params, fn = _batchnorm_fn()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(ValueError, match="changes in place a tensor it did not create.*eval"):
        torchgram.gramian(fn, params, X, batch_dim=batch_dim)
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name])


def test_batchnorm_in_training_mode_is_exact_without_batch_dim() -> None:
    model, params, fn = _batchnorm_fn(track_running_stats=False)
    G = torchgram.gramian(fn, params, X)
    reference = flat_gramian(fn, params, X)
    assert torch.allclose(G, reference, rtol=1e-10, atol=1e-10)


def test_batchnorm_in_eval_mode_is_fine() -> None:
    model, params, fn = _batchnorm_fn()
    model.eval()
    G = torchgram.gramian(fn, params, X, batch_dim=0)
    assert torch.allclose(G, flat_gramian(fn, params, X), rtol=1e-10)


def test_hidden_cross_sample_mixing_is_caught() -> None:
    def mixes(params, x):
        h = x @ params["w"]
        return (h - h.mean(0, keepdim=True)).pow(2).sum(-1)  # centres over the batch

    with pytest.raises(ValueError, match="does not treat samples independently"):
        torchgram.gramian(mixes, W, X, batch_dim=0)
    G = torchgram.gramian(mixes, W, X)  # batch_dim=None is exact for any fn
    assert torch.allclose(G, flat_gramian(mixes, W, X), rtol=1e-10)


def _writes(kind):
    def fn(params, x):
        h = torch.sin(x @ params["w"])
        s = params["s"]
        if kind == "item assignment":
            h[..., 0] = s[0]  # would silently drop s
        elif kind == "augmented":
            h += s
        elif kind == "method":
            h.mul_(s)
        elif kind == "parameter":
            s.add_(1)
        else:
            torch.mul(s, 2, out=s[:])  # into a view of the parameter
        return (h * s).pow(2).sum(-1)

    return fn


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("item assignment", "__setitem__ in place"),
        ("augmented", "add_ in place"),
        ("method", "mul_ in place"),
        ("parameter", "add_ in place"),
        ("out", "mul with out="),
    ],
)
def test_writing_with_a_parameter_is_refused(kind, name, batch_dim) -> None:
    params = {**W, "s": torch.randn(3, dtype=torch.float64)}
    s = params["s"].clone()
    with pytest.raises(ValueError, match=f"fn calls {name} with a parameter.*out-of-place form"):
        torchgram.gramian(_writes(kind), params, X, batch_dim=batch_dim)
    assert torch.equal(params["s"], s)


def test_nothing_left_behind_after_errors() -> None:
    x = X.clone()
    w = W["w"].clone()
    calls = [
        lambda: torchgram.gramian(lambda p, x: [p], W, X, batch_dim=0),
        lambda: torchgram.gramian(losses, W, X, batch_dim=3),
        lambda: torchgram.gramian(_batchnorm_fn()[2], _batchnorm_fn()[1], X, batch_dim=0),
        lambda: torchgram.gramian(lambda p, x: 1 / 0, W, X, batch_dim=0),
    ]
    for call in calls:
        with pytest.raises((TypeError, ValueError, ZeroDivisionError)):
            call()
        assert not _get_current_function_mode_stack()
    torchgram.gramian(losses, W, X, batch_dim=0)
    assert not _get_current_function_mode_stack()
    assert torch.equal(X, x) and torch.equal(W["w"], w)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_the_same_tensor_twice_in_params(batch_dim) -> None:
    w = W["w"]
    with pytest.raises(ValueError, match=r"same tensor at \('a',\) and at \('b',\)"):
        torchgram.gramian(
            lambda p, x: x @ p["a"] @ p["b"].T, {"a": w, "b": w}, X, batch_dim=batch_dim
        )
    # a clone is a parameter of its own
    params = {"a": w, "b": w.clone()}
    G = torchgram.gramian(lambda p, x: x @ p["a"] @ p["b"].T, params, X, batch_dim=batch_dim)
    expected = flat_gramian(lambda p, x: x @ p["a"] @ p["b"].T, params, X)
    assert torch.allclose(torchgram.flatten(G), expected, rtol=1e-10)


def test_complex_parameters_and_outputs_are_refused() -> None:
    with pytest.raises(TypeError, match=r"leaf of params at \('w',\) is complex.*view_as_real"):
        torchgram.gramian(lambda p, x: (x.cfloat() @ p["w"]).abs(), {"w": W["w"].cdouble()}, X)
    with pytest.raises(TypeError, match="fn's output is complex.*view_as_real"):
        torchgram.gramian(lambda p, x: (x @ p["w"]).cdouble(), W, X, batch_dim=0)


def test_complex_intermediates_are_exact() -> None:
    """Real parameters and output, complex values in between (an FFT): exact."""

    def fn(p, x):
        return torch.fft.rfft(torch.tanh(x @ p["w"]), dim=-1).abs().pow(2).sum(-1)

    for batch_dim in (0, None):
        G = torchgram.gramian(fn, W, X, batch_dim=batch_dim)
        assert torch.allclose(G, flat_gramian(fn, W, X), rtol=1e-10)


@pytest.mark.parametrize("in_dims", [True, (None, False)])
def test_in_dims_of_bools_are_refused(in_dims) -> None:
    with pytest.raises(TypeError, match="in_dims"):
        torchgram.gramian(losses, W, X, batch_dim=0, in_dims=in_dims)


@pytest.mark.parametrize("call", ["gramian", "vjp_and_gramian", "jd_grad", "gramian_of"])
def test_errors_name_the_function_called(call) -> None:
    transforms = {
        "gramian": lambda: torchgram.gramian(losses, W, X, batch_dim=3),
        "vjp_and_gramian": lambda: torchgram.vjp_and_gramian(losses, W, X, batch_dim=3),
        "jd_grad": lambda: torchgram.jd_grad(losses, torchgram.weightings.mean, batch_dim=3)(W, X),
        "gramian_of": lambda: torchgram.gramian_of(losses, batch_dim=3)(W, X),
    }
    with pytest.raises(ValueError, match=rf"^{call}\(fn, batch_dim=3\): batch_dim=3 is out"):
        transforms[call]()


def test_weightings_that_return_the_wrong_thing_are_refused() -> None:
    with pytest.raises(TypeError, match=r"jd_grad\(fn, batch_dim=0\): weighting returned a list"):
        torchgram.jd_grad(losses, lambda G: [1.0] * 5, batch_dim=0)(W, X)
    with pytest.raises(ValueError, match=r"shape \[3\], but fn's output has shape \[5\]"):
        torchgram.jd_grad(losses, lambda G: torch.ones(3, dtype=D), batch_dim=0)(W, X)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_empty_batch(batch_dim) -> None:
    empty = X[:0]
    if batch_dim is None:  # no output elements: an empty Gramian
        assert torchgram.gramian(losses, W, empty).shape == (0, 0)
        return
    with pytest.raises(ValueError, match="the batch is empty.*drop_last=True"):
        torchgram.gramian(losses, W, empty, batch_dim=0)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("transform", ["vmap", "grad", "jvp"])
def test_a_torch_func_transform_inside_fn_is_refused(transform, batch_dim) -> None:
    def fn(p, x):
        if transform == "vmap":
            return torch.func.vmap(lambda xi: torch.tanh(xi @ p["w"]).sum())(x)
        if transform == "grad":  # a gradient penalty on the inputs
            g = torch.func.grad(lambda x: torch.tanh(x @ p["w"]).sum())(x)
            return losses(p, x) + g.pow(2).sum(-1)
        _, tangent = torch.func.jvp(lambda x: torch.tanh(x @ p["w"]).sum(-1), (x,), (x,))
        return tangent

    with pytest.raises(ValueError, match="fn applies a torch.func transform of its own"):
        torchgram.gramian(fn, W, X, batch_dim=batch_dim)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_autograd_grad_inside_fn_is_refused(batch_dim) -> None:
    def fn(p, x):
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(losses(p, x).sum(), x, create_graph=True)
        return losses(p, x) + g.pow(2).sum(-1)

    with pytest.raises(ValueError, match=r"fn calls .*torch.autograd.grad \(a gradient inside fn"):
        torchgram.gramian(fn, W, X, batch_dim=batch_dim)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_reentrant_checkpoint_is_refused_and_the_other_is_exact(batch_dim) -> None:
    from torch.utils.checkpoint import checkpoint

    def reentrant(p, x):
        return checkpoint(losses, p, x, use_reentrant=True)

    with pytest.raises(ValueError, match="without a setup_context.*use_reentrant=False"):
        torchgram.gramian(reentrant, W, X, batch_dim=batch_dim)

    def non_reentrant(p, x):
        return checkpoint(losses, p, x, use_reentrant=False)

    G = torchgram.gramian(non_reentrant, W, X, batch_dim=batch_dim)
    assert torch.allclose(G, flat_gramian(losses, W, X), rtol=1e-10)


def test_numpy_inside_fn() -> None:
    """Refused where fn runs under torch.func (with batch_dim); exact where it runs once."""

    def fn(p, x):
        return losses(p, x) * float(np.sign(x.numpy()[0, 0]) ** 2)

    with pytest.raises(ValueError, match=r"reads a tensor's memory directly \(x.numpy\(\)"):
        torchgram.gramian(fn, W, X, batch_dim=0)
    assert torch.allclose(torchgram.gramian(fn, W, X), flat_gramian(losses, W, X), rtol=1e-10)


def test_instance_norm_updating_running_statistics_is_refused_with_batch_dim() -> None:
    norm = nn.InstanceNorm1d(3, affine=True, track_running_stats=True).double()
    params = {k: v.detach() for k, v in norm.named_parameters()}
    x = torch.randn(5, 3, 6, dtype=D)
    before = {k: v.clone() for k, v in norm.named_buffers()}
    with pytest.raises(ValueError, match="instance_norm with running statistics.*model.eval"):
        torchgram.gramian(
            lambda p, x: functional_call(norm, p, (x,)).sum((1, 2)), params, x, batch_dim=0
        )
    for name, value in norm.named_buffers():
        assert torch.equal(value, before[name])
    norm.eval()  # running statistics used, not updated: fine
    fn = lambda p, x: functional_call(norm, p, (x,)).pow(2).sum((1, 2))
    G = torchgram.gramian(fn, params, x, batch_dim=0)
    assert torch.allclose(G, flat_gramian(fn, params, x), rtol=1e-10)
