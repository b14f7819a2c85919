-- Orthanc routing for PneumoScan: every new chest film (CR or DX) goes to the "pneumoscan"
-- modality (DIMSE C-STORE); PneumoScan's own results, which come back into the same study, are
-- never sent (PneumoScan refuses them too: its loop guard).
-- To route by DICOMweb STOW-RS instead, set PNEUMOSCAN_ROUTE = "dicomweb" below and declare
-- the "pneumoscan" server under DicomWeb.Servers (see orthanc.json).

PNEUMOSCAN_ROUTE = "dimse"

function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags["Modality"]
  if (modality ~= "CR" and modality ~= "DX") or tags["Manufacturer"] == "PneumoScan" then
    return
  end
  if PNEUMOSCAN_ROUTE == "dicomweb" then
    RestApiPost("/dicom-web/servers/pneumoscan/stow", '{"Resources": ["' .. instanceId .. '"]}')
  else
    SendToModality(instanceId, "pneumoscan")
  end
end
