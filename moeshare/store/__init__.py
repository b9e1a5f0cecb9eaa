"""The store format: manifest, bank layout, reader and writer. consolidate writes stores, the engine and
export read them; this package is all either needs of the format."""

from moeshare.store.bank import BANK_ROLES, from_bank, to_bank
from moeshare.store.manifest import BankLayer, Manifest, VariantEntry, read_manifest
from moeshare.store.reader import Store, is_moeshare_store, is_store
from moeshare.store.writer import StoreWriter

__all__ = [
    "BANK_ROLES",
    "BankLayer",
    "Manifest",
    "Store",
    "StoreWriter",
    "VariantEntry",
    "from_bank",
    "is_moeshare_store",
    "is_store",
    "read_manifest",
    "to_bank",
]
