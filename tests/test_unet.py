"""The shared DDPM++ U-Net (trilemma.models.unet): shapes at the benchmark resolutions, conditioning."""
import pytest
import torch

from trilemma.models.unet import UNet


@pytest.mark.parametrize("shape, levels", [((1, 28, 28), [28, 14, 7]), ((3, 32, 32), [32, 16, 8, 4]),
                                           ((3, 16, 16), [16, 8, 4])])
@pytest.mark.parametrize("updown", [True, False])
def test_output_has_the_input_shape(shape, levels, updown):
    torch.manual_seed(0)
    net = UNet(shape, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
               norm_groups=4, dropout=0.0, resblock_updown=updown)
    assert net.resolutions == levels
    out = net(torch.randn(2, *shape), torch.rand(2))
    assert out.shape == (2, *shape) and torch.all(out == 0)  # zero-initialised output layer


def test_the_noise_level_conditions_the_output():
    torch.manual_seed(0)
    net = UNet((1, 8, 8), base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
               norm_groups=4, dropout=0.0, embedding="fourier")
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    for block in net.modules():  # give the residual branches weight, so the embedding matters
        if hasattr(block, "conv2"):
            torch.nn.init.normal_(block.conv2.weight, std=0.1)
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([0.1])), net(x, torch.tensor([0.9])))
    net(x, torch.tensor(0.5)).sum().backward()  # a scalar level broadcasts over the batch
