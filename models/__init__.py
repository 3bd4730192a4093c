"""The registered model families: importing this package registers each of them, in this order."""
from models import dcgan  # noqa: F401
from models import vae  # noqa: F401
from models import realnvp  # noqa: F401
from models import ddpm  # noqa: F401
from models import igebm  # noqa: F401
from models import vqvae  # noqa: F401
from models import pixelcnn  # noqa: F401
from models import glow  # noqa: F401
from models import ot_decoder  # noqa: F401
from models import gon  # noqa: F401
