"""Training-free steering baselines (refusal direction, surgical, SCANS, Self-CD), chosen on a validation split of
the run's own data and applied at inference through the decoder's interventions (`dcr_jax.model.interventions`)."""
