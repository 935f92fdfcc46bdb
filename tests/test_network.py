"""The cascade against Tables 1 and 2 of Jiang et al.: shapes, parameter counts, the gradient path."""

import pytest
import torch

from custom.network import CascadedUNet


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_paper_tables():
    net = CascadedUNet()  # the paper's configuration: 16 filters, blocks 1-2-2-4 / 1-1-1, GN(8)
    # Exact counts of this build; DESIGN.md's reference (an assembly of MONAI SegResNet parts) is about
    # 4.75 M, 19.0 M and 1.2 M. Convolutions have no bias (GroupNorm follows), the heads' Conv1 has one.
    assert n_params(net.stage1) == 4_745_347
    assert n_params(net.stage2_encoder) + n_params(net.stage2_deconv_decoder) == 18_973_475
    assert n_params(net.stage2_trilinear_decoder) == 1_205_283
    assert n_params(net) == 24_924_105
    # Table 1 by hand: InitConv 4->16 (3x3x3, no bias) and the stride-2 convolutions doubling channels
    assert net.stage1.encoder.init_conv.conv.weight.shape == (16, 4, 3, 3, 3)
    assert [len(level) - 1 for level in net.stage1.encoder.levels] == [1, 2, 2, 4]
    assert net.stage1.encoder.levels[3][0].conv.weight.shape == (128, 64, 3, 3, 3)
    # Table 2: stage 2 sees 4 sequences + 3 probabilities, with 32 initial filters
    assert net.stage2_encoder.init_conv.conv.weight.shape == (32, 7, 3, 3, 3)
    assert isinstance(net.stage2_deconv_decoder.upsamples[0][1].deconv, torch.nn.ConvTranspose3d)
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) for m in net.stage2_trilinear_decoder.modules())
    assert CascadedUNet(trilinear_decoder=False).stage2_trilinear_decoder is None


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1))


def test_output_shapes_in_train_and_eval_mode(small_net):
    x = torch.randn(2, 4, 32, 24, 16)
    heads = small_net.train()(x)
    assert isinstance(heads, list) and len(heads) == 3
    assert all(h.shape == (2, 3, 32, 24, 16) for h in heads)
    out = small_net.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 24, 16)
    # eval returns the stage 2 deconvolution head, the same as heads[1] without dropout
    with torch.no_grad():
        assert torch.allclose(out, small_net.stage2_deconv_decoder(small_net.stage2_encoder(
            torch.cat([x, torch.sigmoid(small_net.stage1(x))], 1))))


def test_trilinear_decoder_unused_in_eval(small_net):
    calls = []
    small_net.stage2_trilinear_decoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        small_net.eval()(torch.randn(1, 4, 16, 16, 16))
    assert calls == []
    small_net.train()(torch.randn(1, 4, 16, 16, 16))
    assert calls == [1]


def test_stage2_loss_reaches_stage1(small_net):
    heads = small_net.train()(torch.randn(1, 4, 16, 16, 16))
    heads[1].square().mean().backward()  # a loss on the stage 2 output alone
    stage1_grads = [p.grad for p in small_net.stage1.parameters()]
    assert all(g is not None for g in stage1_grads)
    assert sum(float(g.abs().sum()) for g in stage1_grads) > 0
    assert float(small_net.stage1.encoder.init_conv.conv.weight.grad.abs().sum()) > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), dropout_prob=None)
    checkpointed = CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), dropout_prob=None, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 16, 16, 16)
    for net in (plain, checkpointed):
        sum(h.sum() for h in net.train()(x)).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_rejects_sizes_not_divisible_by_8(small_net):
    with pytest.raises(ValueError, match="divisible by 8"):
        small_net(torch.randn(1, 4, 20, 16, 16))
