"""bifocal.model.hf"""
