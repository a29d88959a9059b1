"""Real data sets: a registry of sources, a verified cache, loaders and tokenizers.

    from revbits.data import fetch, load_shakespeare, CharTokenizer
    fetch("shakespeare")                      # or: revbits data fetch shakespeare
    text = load_shakespeare("train")
    tok = CharTokenizer.from_text(load_shakespeare())

Nothing is downloaded by a loader unless it is asked to (``download=True``): a data set that is
not cached raises ``MissingDataError``, whose message gives the command that gets it.
"""

from . import bible, cifar10, fashion_mnist, shakespeare, wiki  # noqa: F401  (importing registers each data set)
from .bible import VersePair, load_bible_pairs
from .cache import data_root, dataset_dir, read_manifest
from .cifar10 import load_cifar10
from .errors import DataError, DataFormatError, FetchError, MissingDataError, SourceError, UnknownDatasetError
from .fashion_mnist import load_fashion_mnist
from .idx import read_idx
from .registry import Dataset, fetch, get, is_cached, list_datasets, load, names, require
from .shakespeare import load_shakespeare
from .sources import Source
from .tokenizers import CharTokenizer, WordTokenizer
from .wiki import load_wiki_extract

__all__ = [
    "CharTokenizer",
    "DataError",
    "DataFormatError",
    "Dataset",
    "FetchError",
    "MissingDataError",
    "Source",
    "SourceError",
    "UnknownDatasetError",
    "VersePair",
    "WordTokenizer",
    "data_root",
    "dataset_dir",
    "fetch",
    "get",
    "is_cached",
    "list_datasets",
    "load",
    "load_bible_pairs",
    "load_cifar10",
    "load_fashion_mnist",
    "load_shakespeare",
    "load_wiki_extract",
    "names",
    "read_idx",
    "read_manifest",
    "require",
]
