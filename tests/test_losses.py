"""The training losses, tested by their properties rather than by restating their bodies: each is zero exactly at its
target, its gradient has the expected sign and size, a hand-computed value on tiny tensors (written out as numbers),
its reduction (per sample or over the batch), its special cases (η = 0, α = 1) and what it must not differentiate
through (SalUn's substitute prediction, SiD's normaliser). Tiny tensors and stand-in models only, no UNet."""

from types import SimpleNamespace

import pytest
import torch

from erasure.methods.esd import esd_loss
from erasure.methods.salun import forget_loss, retain_loss, saliency_loss
from erasure.methods.sfd import fake_score_loss, one_step, regression_loss, sid_generator_loss
from erasure.methods.spm import anchor_loss, erase_loss
from pipelines.prediction import to_x0


SD_ABAR = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)  # SD's scaled_linear ᾱ


def t(*values) -> torch.Tensor:
    """A (B, 1, 1, 1) tensor from B numbers: one latent element per sample."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# ESD (Gandikota et al., Eq. 5) and SPM's erasing loss (Lyu et al., Eq. 4): the same negatively guided target


@pytest.mark.parametrize("loss", [esd_loss, erase_loss], ids=["esd", "spm-erase"])
def test_negative_guidance_loss_is_zero_exactly_at_the_target(loss):
    """The prediction ε_null − η(ε_c − ε_null) costs nothing, for any η; the prediction of the unerased model
    (ε_c) does not."""
    e_c, e_null = randn(2, 4, 3, 3, seed=1), randn(2, 4, 3, 3, seed=2)
    for eta in (0.0, 1.0, 2.5):
        target = e_null - eta * (e_c - e_null)
        assert torch.allclose(loss(target, e_c, e_null, eta), torch.zeros(2), atol=1e-12)
        assert (loss(e_c, e_c, e_null, eta) > 0).all(), "the concept's own prediction is not the target"


@pytest.mark.parametrize("loss", [esd_loss, erase_loss], ids=["esd", "spm-erase"])
def test_negative_guidance_loss_by_hand(loss):
    """Two samples of one element each. Sample 0: ε_θ 1, ε_c 1, ε_null 0, η 1 → target −1, loss (1 − (−1))² = 4.
    Sample 1: ε_θ 0, ε_c 2, ε_null 1, η 1 → target 1 − (2 − 1) = 0, loss 0. At η 2 the targets are −2 and −1:
    losses 9 and 1."""
    e_theta, e_c, e_null = t(1.0, 0.0), t(1.0, 2.0), t(0.0, 1.0)
    assert loss(e_theta, e_c, e_null, 1.0).tolist() == [4.0, 0.0]
    assert loss(e_theta, e_c, e_null, 2.0).tolist() == [9.0, 1.0]


@pytest.mark.parametrize("loss", [esd_loss, erase_loss], ids=["esd", "spm-erase"])
def test_negative_guidance_loss_is_a_per_sample_mean(loss):
    """(B, 4, h, w) → (B,): each sample's loss is the mean over its own elements (a constant error of 3 costs 9 at
    any latent size) and does not depend on the other samples."""
    for shape in ((3, 4, 2, 2), (3, 4, 5, 7)):
        e_c, e_null = torch.zeros(shape), torch.zeros(shape)
        out = loss(torch.full(shape, 3.0), e_c, e_null, 1.0)
        assert out.shape == (3,) and torch.equal(out, torch.full((3,), 9.0))
    e_theta, e_c, e_null = randn(3, 4, 2, 2, seed=3), randn(3, 4, 2, 2, seed=4), randn(3, 4, 2, 2, seed=5)
    whole = loss(e_theta, e_c, e_null, 1.0)
    e_theta[0] += 10.0
    changed = loss(e_theta, e_c, e_null, 1.0)
    assert changed[0] > whole[0] and torch.equal(changed[1:], whole[1:])


@pytest.mark.parametrize("loss", [esd_loss, erase_loss], ids=["esd", "spm-erase"])
def test_negative_guidance_gradient_is_twice_the_error_over_the_element_count(loss):
    """∂L/∂ε_θ = 2(ε_θ − target)/N per sample (N = 4·h·w elements): it points from the target to the prediction,
    so a small descent step moves the prediction toward the target and lowers the loss."""
    e_c, e_null = randn(2, 4, 2, 3, seed=6), randn(2, 4, 2, 3, seed=7)
    eta, n = 1.0, 4 * 2 * 3
    target = e_null - eta * (e_c - e_null)
    e_theta = randn(2, 4, 2, 3, seed=8).requires_grad_(True)
    before = loss(e_theta, e_c, e_null, eta)
    (grad,) = torch.autograd.grad(before.sum(), e_theta)
    assert torch.allclose(grad, 2 * (e_theta.detach() - target) / n, atol=1e-6)
    stepped = e_theta.detach() - 0.1 * grad
    assert ((stepped - target).norm() < (e_theta.detach() - target).norm())
    assert (loss(stepped, e_c, e_null, eta) < before.detach()).all()
    # by hand: one element, ε_θ 1, target −1 (ε_c 1, ε_null 0, η 1) → ∂L/∂ε_θ = 2·(1 − (−1)) = 4
    one = t(1.0).requires_grad_(True)
    loss(one, t(1.0), t(0.0), 1.0).sum().backward()
    assert one.grad.item() == 4.0


@pytest.mark.parametrize("loss", [esd_loss, erase_loss], ids=["esd", "spm-erase"])
def test_at_eta_zero_the_target_is_the_unconditional_prediction(loss):
    """η = 0: the loss is the distance to ε_null (the surrogate) alone, whatever the concept's prediction."""
    e_theta, e_null = randn(2, 4, 2, 2, seed=9), randn(2, 4, 2, 2, seed=10)
    a = loss(e_theta, randn(2, 4, 2, 2, seed=11), e_null, 0.0)
    b = loss(e_theta, randn(2, 4, 2, 2, seed=12) * 100, e_null, 0.0)
    assert torch.equal(a, b)
    assert torch.equal(loss(e_null, randn(2, 4, 2, 2, seed=13), e_null, 0.0), torch.zeros(2))


def test_spm_erase_loss_takes_one_eta_per_sample():
    """η may be a (B,) tensor: each row is the scalar-η loss of that row (one batch mixing η 0 and η 3)."""
    e_theta, e_c, e_null = randn(2, 4, 2, 2, seed=14), randn(2, 4, 2, 2, seed=15), randn(2, 4, 2, 2, seed=16)
    mixed = erase_loss(e_theta, e_c, e_null, torch.tensor([0.0, 3.0]))
    assert torch.allclose(mixed[0], erase_loss(e_theta, e_c, e_null, 0.0)[0])
    assert torch.allclose(mixed[1], erase_loss(e_theta, e_c, e_null, 3.0)[1])


def test_spm_erase_loss_with_the_empty_surrogate_is_esds_loss():
    """Eq. 4 of SPM with c_sur = "" is ESD's Eq. 5: the two functions agree on the same predictions."""
    e_theta, e_c, e_null = randn(3, 4, 2, 2, seed=17), randn(3, 4, 2, 2, seed=18), randn(3, 4, 2, 2, seed=19)
    for eta in (0.0, 1.0, 3.0):
        assert torch.allclose(erase_loss(e_theta, e_c, e_null, eta), esd_loss(e_theta, e_c, e_null, eta))


def test_spm_anchor_loss_is_zero_when_the_membrane_leaves_the_anchor_alone():
    """Eqs. 5–7: zero exactly when the membrane's prediction is the original's; per anchor (A,), mean over elements;
    by hand: errors 1 and −2 on one element → 1 and 4; gradient 2(ε_SPM − ε)/N toward the original."""
    e = randn(3, 4, 2, 2, seed=20)
    assert torch.equal(anchor_loss(e.clone(), e), torch.zeros(3))
    assert anchor_loss(t(1.0, -2.0), t(0.0, 0.0)).tolist() == [1.0, 4.0]
    assert torch.equal(anchor_loss(torch.full((2, 4, 3, 3), 2.0), torch.zeros(2, 4, 3, 3)), torch.full((2,), 4.0))
    pred = randn(3, 4, 2, 2, seed=21).requires_grad_(True)
    (grad,) = torch.autograd.grad(anchor_loss(pred, e).sum(), pred)
    assert torch.allclose(grad, 2 * (pred.detach() - e) / 16, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# SalUn (Fan et al.): forget ("random label"), retain, and the saliency mask's loss


def test_salun_forget_loss_is_zero_at_the_substitute_and_a_batch_mean():
    """Zero exactly when the forget prediction equals the substitute's; a scalar over the batch; by hand: errors 1
    and 3 on one element each → (1 + 9) / 2 = 5."""
    e = randn(2, 4, 2, 2, seed=22)
    assert forget_loss(e.clone(), e).item() == 0.0
    out = forget_loss(t(1.0, 3.0), t(0.0, 0.0))
    assert out.shape == () and out.item() == 5.0


def test_salun_forget_loss_does_not_differentiate_through_the_substitute():
    """The substitute prediction comes from the *current* model (no frozen teacher) and is a stop-gradient target:
    with both predictions made by the same parameter, the gradient is the forget branch's alone."""
    w = torch.tensor(2.0, requires_grad=True)
    x_forget, x_sub = t(1.0, 2.0), t(3.0, -1.0)
    forget_loss(w * x_forget, w * x_sub).backward()
    # ∂/∂w mean((w x_f − sg(w x_s))²) = mean(2 (w x_f − w x_s) x_f) = (2·(2 − 6)·1 + 2·(4 + 2)·2) / 2 = 8
    assert w.grad.item() == pytest.approx(8.0)
    sub = t(3.0).requires_grad_(True)
    pred = t(1.0).requires_grad_(True)
    forget_loss(pred, sub).backward()
    assert sub.grad is None and pred.grad.item() == pytest.approx(2 * (1.0 - 3.0)), "∂/∂pred = 2(pred − sub)/N"


def test_salun_retain_loss_is_the_diffusion_loss():
    """Zero when the prediction is the noise; the mean squared error over all elements of the batch; its gradient
    2(ε_θ − ε)/N points from the noise to the prediction."""
    noise = randn(2, 4, 2, 2, seed=23)
    assert retain_loss(noise.clone(), noise).item() == 0.0
    assert retain_loss(t(2.0, 0.0), t(0.0, 0.0)).item() == 2.0  # (4 + 0) / 2
    pred = randn(2, 4, 2, 2, seed=24).requires_grad_(True)
    retain_loss(pred, noise).backward()
    assert torch.allclose(pred.grad, 2 * (pred.detach() - noise) / pred.numel(), atol=1e-6)


def test_salun_saliency_loss_scores_the_guided_prediction():
    """The mask's loss takes the classifier-free-guided prediction (1 + w)·ε_c − w·ε_null against the noise:
    at w = 0 it is the plain diffusion loss of ε_c; identical branches equal to the noise give 0 at any w; by hand
    ε_c 1, ε_null 0, noise 0, w 7.5 → 8.5² = 72.25; the gradient reaches both branches, the null one −w/(1 + w)
    times the conditional one."""
    noise, e_c = randn(2, 4, 2, 2, seed=25), randn(2, 4, 2, 2, seed=26)
    assert torch.equal(saliency_loss(e_c, randn(2, 4, 2, 2, seed=27), noise, 0.0), retain_loss(e_c, noise))
    for w in (0.0, 1.0, 7.5):
        assert saliency_loss(noise.clone(), noise.clone(), noise, w).item() == pytest.approx(0.0, abs=1e-10)
    assert saliency_loss(t(1.0), t(0.0), t(0.0), 7.5).item() == 72.25
    c, u = t(1.0).requires_grad_(True), t(0.0).requires_grad_(True)
    saliency_loss(c, u, t(0.0), 7.5).backward()
    assert c.grad.item() == pytest.approx(2 * 8.5 * 8.5)  # ∂/∂ε_c (8.5 ε_c − 7.5 ε_null)² = 2·8.5·8.5
    assert u.grad.item() == pytest.approx(-2 * 8.5 * 7.5)


# ---------------------------------------------------------------------------------------------------------------
# SFD / SiD: the generator loss, the fake score's denoising loss, the regression term, and the x̂₀ conversions


def test_sid_generator_loss_is_zero_when_the_scores_agree():
    """y_real == y_fake: the generator's distribution already matches the teacher's there — no loss, no gradient,
    for any α."""
    x_g = randn(2, 4, 2, 2, seed=28).requires_grad_(True)
    y = randn(2, 4, 2, 2, seed=29)
    for alpha in (1.0, 1.2):
        out = sid_generator_loss(x_g, y, y.clone(), alpha)
        assert torch.equal(out, torch.zeros(2))
        (grad,) = torch.autograd.grad(out.sum(), x_g)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_sid_generator_loss_by_hand():
    """One element: x_g 0, y_real 2, y_fake 1 → w = |0 − 2| = 2; α 1: (2 − 1)(1 − 0)/2 = 0.5; α 1.2:
    (2 − 1)((2 − 0) − 1.2·(2 − 1))/2 = 0.4. A second sample with its own w: x_g 1, y_real 0, y_fake 2 → w 1,
    α 1: (0 − 2)(2 − 1)/1 = −2, α 1.2: (0 − 2)((0 − 1) − 1.2·(0 − 2)) = −2.8 (not a square: it can be negative)."""
    x_g, y_real, y_fake = t(0.0, 1.0), t(2.0, 0.0), t(1.0, 2.0)
    assert sid_generator_loss(x_g, y_real, y_fake, 1.0).tolist() == pytest.approx([0.5, -2.0])
    assert sid_generator_loss(x_g, y_real, y_fake, 1.2).tolist() == pytest.approx([0.4, -2.8])


def test_sid_generator_loss_sums_over_elements_per_sample():
    """(B, 4, h, w) → (B,), a sum over C·H·W (not a mean): the constant example above on 4×2×2 latents is 16 × 0.5."""
    x_g, y_real, y_fake = torch.zeros(3, 4, 2, 2), torch.full((3, 4, 2, 2), 2.0), torch.ones(3, 4, 2, 2)
    out = sid_generator_loss(x_g, y_real, y_fake, 1.0)
    assert out.shape == (3,) and out.tolist() == pytest.approx([8.0] * 3)


def test_sid_generator_gradient_moves_the_sample_along_real_minus_fake_with_w_stopped():
    """∂L/∂x_g = −(y_real − y_fake)/w (both α), so descent moves x_g toward where the teacher's denoised estimate
    lies relative to the fake score's. w is a stop-gradient normaliser: with the numbers above (w 2) the gradient
    is −0.5; were w differentiated it would be −0.25. ∂L/∂y_real = ((y_real − x_g) + (1 − 2α)(y_real − y_fake))/w
    = (2 − 1)/2 = 0.5 at α 1: the gradient reaches both scores' outputs, hence through their input into G."""
    for alpha in (1.0, 1.2):
        x_g, y_real, y_fake = (v.requires_grad_(True) for v in (t(0.0), t(2.0), t(1.0)))
        sid_generator_loss(x_g, y_real, y_fake, alpha).sum().backward()
        assert x_g.grad.item() == pytest.approx(-0.5), alpha
        assert y_real.grad.item() == pytest.approx((2.0 + (1 - 2 * alpha) * 1.0) / 2.0), alpha
        assert y_fake.grad is not None
    x_g = randn(2, 4, 2, 2, seed=30).requires_grad_(True)
    y_real, y_fake = randn(2, 4, 2, 2, seed=31), randn(2, 4, 2, 2, seed=32)
    (grad,) = torch.autograd.grad(sid_generator_loss(x_g, y_real, y_fake, 1.0).sum(), x_g)
    w = (x_g.detach() - y_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad, -(y_real - y_fake) / w, atol=1e-5)


def test_sid_generator_loss_stays_finite_when_the_sample_is_the_teachers_estimate():
    """x_g == y_real makes w = 0: the normaliser's floor keeps the loss and its gradient finite."""
    x_g = randn(2, 4, 2, 2, seed=33).requires_grad_(True)
    y_real, y_fake = x_g.detach().clone(), randn(2, 4, 2, 2, seed=34)
    out = sid_generator_loss(x_g, y_real, y_fake, 1.0)
    (grad,) = torch.autograd.grad(out.sum(), x_g)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("loss", [fake_score_loss, regression_loss], ids=["fake-score", "regression"])
def test_sfd_squared_error_losses_sum_per_sample(loss):
    """The fake score's denoising loss Σ(ε_ψ − ε)² and the regression term Σ(G(z) − x_teacher)²: zero exactly at
    the target, (B,) sums over C·H·W (a constant error of 1 on 4×2×2 costs 16; errors 1 and −3 on one element
    cost 1 and 9), gradient 2(pred − target) — the size of a sum, not of a mean — pointing from the target."""
    target = randn(2, 4, 2, 2, seed=35)
    assert torch.equal(loss(target.clone(), target), torch.zeros(2))
    assert torch.equal(loss(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)), torch.full((2,), 16.0))
    assert loss(t(1.0, -3.0), t(0.0, 0.0)).tolist() == [1.0, 9.0]
    pred = randn(2, 4, 2, 2, seed=36).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(pred, target).sum(), pred)
    assert torch.allclose(grad, 2 * (pred.detach() - target), atol=1e-6)


def test_x0_from_eps_inverts_the_schedulers_forward_noising():
    """x_t = √ᾱ x₀ + √(1 − ᾱ) ε (as ``scheduler.add_noise`` draws it), one timestep per sample: x̂₀(x_t, ε, ᾱ) gives
    x₀ back; with the wrong ε it does not; at ᾱ = 1 (no noise) x̂₀ = x_t."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, eps = randn(4, 4, 3, 3, seed=37), randn(4, 4, 3, 3, seed=38)
    steps = torch.tensor([0, 250, 625, 979])
    x_t = sched.add_noise(x0, eps, steps)
    a = sched.alphas_cumprod[steps].view(-1, 1, 1, 1)
    assert torch.allclose(to_x0(eps, x_t, a, "epsilon"), x0, atol=1e-4)
    assert not torch.allclose(to_x0(eps + 0.1, x_t, a, "epsilon"), x0, atol=1e-2)
    assert torch.equal(to_x0(eps, x0, torch.ones(4, 1, 1, 1), "epsilon"), x0)
    # by hand: ᾱ = 0.64 (√ᾱ 0.8, √(1 − ᾱ) 0.6), x₀ 1, ε 0.5 → x_t 0.8 + 0.3 = 1.1 → x̂₀ (1.1 − 0.3)/0.8 = 1
    assert to_x0(t(0.5), t(1.1), t(0.64), "epsilon").item() == pytest.approx(1.0)


class _Oracle(torch.nn.Module):
    """A "generator UNet" that knows each condition's clean latent: at (x_t, t) it predicts the ε that takes x_t
    back to it, ε = (x_t − √ᾱ_t x₀)/√(1 − ᾱ_t). ``cond`` holds row indices into ``clean``."""

    def __init__(self, clean: torch.Tensor, abar: torch.Tensor):
        super().__init__()
        self.register_buffer("clean", clean)
        self.abar = abar
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # a module with parameters, as a UNet
        self.seen_t = None

    def forward(self, x, t, cond):
        self.seen_t = t
        a = self.abar[t].view(-1, 1, 1, 1)
        x0 = self.clean[cond.long()]
        return SimpleNamespace(sample=(x - a.sqrt() * x0) / (1 - a).sqrt() + self.dummy)


def test_one_step_with_an_oracle_generator_returns_the_clean_latent():
    """The one-step generator evaluates G once at t_init on x = √(1 − ᾱ) z (a zero clean input): a G that predicts
    the exact ε of a clean latent makes one_step return that latent, whatever z; G sees t_init for every row."""
    abar = SD_ABAR
    clean = randn(3, 4, 2, 2, seed=39)
    oracle = _Oracle(clean, abar)
    cond = torch.tensor([2, 0, 1, 2])
    for seed in (40, 41):
        x_g = one_step(oracle, randn(4, 4, 2, 2, seed=seed), cond, abar, 625)
        assert x_g.shape == (4, 4, 2, 2) and torch.allclose(x_g, clean[cond], atol=1e-4)
    assert oracle.seen_t.tolist() == [625] * 4


class _Zero(torch.nn.Module):
    """A "generator UNet" that predicts no noise at all."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond):
        return SimpleNamespace(sample=torch.zeros_like(x) + self.dummy)


def test_one_step_with_a_zero_eps_generator_rescales_the_input():
    """G ≡ 0: x_g = √(1 − ᾱ) z / √ᾱ. By hand at ᾱ 0.2 (√(0.8 / 0.2) = 2): z 1.5 → 3, z −0.5 → −1."""
    abar = torch.full((1000,), 0.2)
    assert one_step(_Zero(), t(1.5, -0.5), torch.zeros(2), abar, 625).flatten().tolist() == pytest.approx([3.0, -1.0])
