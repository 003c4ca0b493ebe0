"""The skeptic's controls of the experiment (docs/controls.md): matched designs that separate the gradient norm
from response length and loss (`matching`), the reversion analysis against Gamma = pretrained - aligned weights
(`reversion`), and their preparation inside `fastsel continual` (`prepare`)."""
