"""mmcli: a command-line toolbox for multimodal (image, text, audio) representation learning."""

__version__ = "0.1.0"
