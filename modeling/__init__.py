"""The networks, in torch: the SentenceVAE (encoder + decoder), the OPT blocks grafted onto sentence
vectors with the termination head, the SLLM that joins them, their losses, the torch reference
decoders, weights on disk and the cloud bundle. Training, export and the cloud all import this
package; it imports no trainer code (`training/`) and nothing of the edge."""
