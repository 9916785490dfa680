"""Quality: code extraction, the pass@1 sandbox, and logit metrics against the dense model.

Import the submodules directly (`hotcold.quality.sandbox`, `.extract`, `.metrics`); `metrics` imports
torch inside its functions, the others only the standard library.
"""
