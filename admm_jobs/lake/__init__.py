"""The data lake: storage by URI, the IDX format, the landing contract, batches and test sets in the lake,
and the versioned datasets assembled from them."""
