"""Through Detectron2: round trips with the real DetectionCheckpointer, forward equivalence, the backbone, verify, the gate and testing API, the example project, the legacy install."""
