"""CMDPI (data-efficient Med-VQA): co-regularised pre-training (`coregularized`), then fine-tuning with difference reconstruction and head mixup (`difference_reconstruction`)."""
