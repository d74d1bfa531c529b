"""Training data: toy laws with exact ground truth (cmbench.data.toy) and image sets (cmbench.data.images).
Both give `sample_batch(n, generator)`: a batch drawn with the run's generator (the data cursor) and its class
labels (None without them)."""
from cmbench.config import ImageData


def make_data(dataset):
    """The dataset object of a resolved `RunConfig.dataset`."""
    if isinstance(dataset, ImageData):
        from cmbench.data.images import make_image_data
        return make_image_data(dataset)
    from cmbench.data.toy import make_toy
    return make_toy(dataset.model_dump())
