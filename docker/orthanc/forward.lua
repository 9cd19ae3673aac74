-- Send each study that holds only CT to ctscreen once it is complete (no new instance for
-- StableAge seconds). A study that already holds something else, such as the SR and key
-- images ctscreen sends back, is left alone, so results never go round in a loop.
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  for _, s in ipairs(series) do
    if s['MainDicomTags']['Modality'] ~= 'CT' then
      return
    end
  end
  print('ctscreen-pacs: sending study ' .. studyId .. ' to ctscreen')
  -- The REST route sends a whole study in one association (Lua's SendToModality
  -- takes single instances).
  RestApiPost('/modalities/ctscreen/store', studyId)
end
