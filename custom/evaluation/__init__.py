"""BraTS metrics: region and lesion-wise scores, matching predictions to references, CSV summaries."""
