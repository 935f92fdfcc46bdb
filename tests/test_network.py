"""The cascade against Tables 1 and 2 of Jiang et al.: shapes, parameter counts, the gradient path."""

import pytest
import torch
from custom.model.network import CascadedUNet


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def table_parameters(in_channels: int, filters: int, blocks_down=(1, 2, 2, 4), upsampling: str = "deconv") -> dict:
    """Parameters of one stage as Tables 1 and 2 list its layers, counted by hand (3 outputs, GroupNorm's weight and
    bias per channel; convolutions without bias, since a GroupNorm follows them, except the EndConv)."""

    def res_block(c):  # GN-ReLU-Conv3-GN-ReLU-Conv3 + identity
        return 2 * 2 * c + 2 * 27 * c * c

    encoder = 27 * in_channels * filters  # InitConv 3x3x3
    for level, n_blocks in enumerate(blocks_down):
        c = filters * 2**level
        encoder += (27 * (c // 2) * c if level else 0) + n_blocks * res_block(c)  # stride-2 Conv3 doubling channels
    decoder = 0
    for level in range(len(blocks_down) - 1, 0, -1):
        c = filters * 2**level
        up = 8 * (c // 2) ** 2 + c // 2 if upsampling == "deconv" else 0  # ConvTranspose 2x2x2 with bias; trilinear: 0
        decoder += c * (c // 2) + up + res_block(c // 2)  # Conv1 halving channels, up-sampling, one ResBlock
    end_conv = filters * 3 + 3  # EndConv: Conv1 to 3 outputs, with bias, no norm before it
    return {"encoder": encoder, "decoder": decoder + end_conv}


def test_parameter_counts_match_the_paper_tables():
    net = CascadedUNet()  # the paper's configuration: 16 filters, blocks 1-2-2-4 / 1-1-1, GN(8)
    stage1 = table_parameters(4, 16)
    stage2 = table_parameters(7, 32)
    trilinear = table_parameters(7, 32, upsampling="trilinear")["decoder"]
    assert n_params(net.stage1) == sum(stage1.values()) == 4_745_315
    assert n_params(net.stage2_encoder) + n_params(net.stage2_deconv_decoder) == sum(stage2.values()) == 18_973_411
    assert n_params(net.stage2_trilinear_decoder) == trilinear == 1_205_219
    assert n_params(net) == 24_923_945
    # Table 1 by hand: InitConv 4->16 (3x3x3, no bias) and the stride-2 convolutions doubling channels
    assert net.stage1.encoder.init_conv.conv.weight.shape == (16, 4, 3, 3, 3)
    assert [len(level) - 1 for level in net.stage1.encoder.levels] == [1, 2, 2, 4]
    assert net.stage1.encoder.levels[3][0].conv.weight.shape == (128, 64, 3, 3, 3)
    # Table 2: stage 2 sees 4 sequences + 3 probabilities, with 32 initial filters
    assert net.stage2_encoder.init_conv.conv.weight.shape == (32, 7, 3, 3, 3)
    assert isinstance(net.stage2_deconv_decoder.upsamples[0][1].deconv, torch.nn.ConvTranspose3d)
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) for m in net.stage2_trilinear_decoder.modules())
    assert CascadedUNet(trilinear_decoder=False).stage2_trilinear_decoder is None


def test_output_heads_are_the_tables_end_conv():
    net = CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1))
    decoders = {
        "stage1": net.stage1.decoder,
        "deconv": net.stage2_deconv_decoder,
        "trilinear": net.stage2_trilinear_decoder,
    }
    for name, decoder in decoders.items():
        layers = list(decoder.head.modules())
        assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.ReLU)) for m in layers), name
        convs = [m for m in layers if isinstance(m, torch.nn.Conv3d)]
        assert len(convs) == 1 and convs[0].kernel_size == (1, 1, 1) and convs[0].bias is not None, name
    # the head is applied to the last residual block's output as it is (no activation in between)
    x = torch.randn(1, 8, 8, 8, 8)
    head = net.stage1.decoder.head
    assert torch.equal(head(x), torch.nn.functional.conv3d(x, head.conv.weight, head.conv.bias))


def test_preactivated_head_keeps_older_checkpoints_loadable():
    old = CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), preactivated_head=True)
    # each of the 3 heads has a GroupNorm (weight and bias per channel) in front of its Conv1: 2 x 8 in stage 1
    # (8 filters) + 2 decoders x 2 x 16 in stage 2 (16 filters); the paper's size: 2 x 16 + 2 x 2 x 32 = 160
    assert n_params(old) - n_params(CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1))) == 2 * 8 + 2 * 2 * 16
    assert n_params(CascadedUNet(preactivated_head=True)) == 24_923_945 + 160 == 24_924_105  # the count before
    head = old.stage2_deconv_decoder.head
    assert isinstance(head[0], torch.nn.GroupNorm) and isinstance(head[1], torch.nn.ReLU)
    reloaded = CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), preactivated_head=True)
    reloaded.load_state_dict(old.state_dict())  # strict
    with pytest.raises(RuntimeError, match="head"):
        CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1)).load_state_dict(old.state_dict())


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
        assert torch.allclose(
            out,
            small_net.stage2_deconv_decoder(
                small_net.stage2_encoder(torch.cat([x, torch.sigmoid(small_net.stage1(x))], 1))
            ),
        )


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
    checkpointed = CascadedUNet(
        init_filters=8, blocks_down=(1, 1, 1, 1), dropout_prob=None, gradient_checkpointing=True
    )
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 16, 16, 16)
    for net in (plain, checkpointed):
        sum(h.sum() for h in net.train()(x)).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_rejects_sizes_not_divisible_by_8(small_net):
    with pytest.raises(ValueError, match="divisible by 8"):
        small_net(torch.randn(1, 4, 20, 16, 16))
