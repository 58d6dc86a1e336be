"""The node's DICOM identity: its implementation class UID and version name, and its UID roots.

Everything the node makes a UID for sits under one root registered for it, ``1.2.826.0.1.3680043.10.1431``:
``.1`` identifies the implementation (A-ASSOCIATE and the File Meta of every stored file, PS3.7 D.3.3.2),
``.2`` the derived objects (SEG, SC, images) it writes.
"""

from node import __version__

UID_ROOT = "1.2.826.0.1.3680043.10.1431."
#: Our implementation identity in association negotiation and in every stored File Meta.
IMPLEMENTATION_CLASS_UID = UID_ROOT + "1.0"
#: At most 16 characters (SH).
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]
#: Prefix of the UIDs of derived objects (series, instances) the node writes.
DERIVED_UID_ROOT = UID_ROOT + "2."
