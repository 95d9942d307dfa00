"""The model classes of the families (lm, seq2seq, encoder); tfx.families.build_model builds a recipe's."""
