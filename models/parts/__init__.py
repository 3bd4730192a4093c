"""Networks that two or more families share, one file per role; a family imports these (and
``trilemma.models.blocks``), never another family's file.

    pixelcnn    the Gated PixelCNN: masked row convolutions, gated layers, the two stacks, the masked
                output head and the network with its cached sampler (pixelcnn, pixeliqn, pixelrnn, vlae)
    energy      IGEBM's convolutional energy ResNet (igebm, flow_ce, vaebm)
    glow        the Glow flow: y <-> standard-normal latents, exact log-determinant (glow, flow_ce)
    vae         the convolutional VAE: encoder, decoder and its bound (vae, vlae)
    vdvae       VD-VAE's hierarchical VAE: encoder, top-down path of latent groups, output mixture (vdvae,
                vaebm)
    vqvae       the VQ-VAE autoencoder: encoder, codebook, decoder and eq. 3 (vqvae, absorbing_diffusion)
    gan         the GAN layers ProGAN, StyleGAN2 and BigGAN share (minibatch std, widths, pixel norm,
                2x upsampling)
"""
