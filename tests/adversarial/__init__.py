"""The adversarial corpus: files an attacker (or a broken tool) would hand the converter."""
