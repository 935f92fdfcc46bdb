"""The cascaded U-Net of Jiang et al., its loss and learning-rate schedule, and its weight files. Imports
``custom.core`` only."""
