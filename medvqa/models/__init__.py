"""Models shared by the papers: the registry (`registry`), encoders (`towers`, `effnet`, `pretraining`, `zoo`), language models (`lm`, `prefix`)."""
